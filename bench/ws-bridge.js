'use strict'

// The bridge anyone writes in ten lines with `ws` and `net`, as the reference a production gateway must not
// lose to: one upstream socket per connection, chosen by path; each message written to it as it comes, each
// TCP read sent as one binary message. No backpressure, no checks, no limits beyond ws's defaults.
// argv[2] is the upstream ports as JSON; the listening port goes to the parent over IPC.
const net = require('node:net')
const { WebSocketServer } = require('ws')

const ports = JSON.parse(process.argv[2])
// ws's default maxPayload (100 MiB) takes the 1 MiB messages of the large scenario.
const server = new WebSocketServer({ host: '127.0.0.1', port: 0, backlog: 4096, perMessageDeflate: false },
  () => process.send({ port: server.address().port }))

server.on('connection', (ws, request) => {
  const upstream = net.connect({ port: ports[request.url.slice(1)], host: '127.0.0.1', noDelay: true })
  ws.on('message', data => upstream.write(data))
  upstream.on('data', chunk => ws.send(chunk, { binary: true }))
  ws.on('close', () => upstream.destroy())
  upstream.on('close', () => ws.terminate())
  ws.on('error', () => upstream.destroy())
  upstream.on('error', () => ws.terminate())
})

process.on('disconnect', () => process.exit(0))
process.on('SIGTERM', () => process.exit(0))
