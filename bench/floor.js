'use strict'

// The least a Node.js WebSocket-to-TCP bridge can do per handshake, as a reference for the handshake
// scenario only: Node's HTTP parser, the accept hash, the upstream connect, the 101, and only the framing
// that scenario needs (whole masked frames of under 64 KiB per read, then a close). No Fastify, no ws, no
// checks: a floor for what any Node bridge spends per connection, not a usable gateway.
// argv[2] is the upstream ports as JSON; the listening port goes to the parent over IPC.
const http = require('node:http')
const net = require('node:net')
const { createHash } = require('node:crypto')

const ports = JSON.parse(process.argv[2])
const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

const server = http.createServer((request, response) => {
  response.statusCode = 404
  response.end()
})

server.on('upgrade', (request, socket, head) => {
  socket.on('error', () => socket.destroy())
  const upstream = net.connect({ port: ports[request.url.slice(1)], host: '127.0.0.1', noDelay: true }, () => {
    const accept = createHash('sha1').update(request.headers['sec-websocket-key'] + GUID).digest('base64')
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
    const onClient = chunk => {
      for (let i = 0; i + 6 <= chunk.length;) {
        const opcode = chunk[i] & 0x0f
        let length = chunk[i + 1] & 0x7f
        let at = i + 2
        if (length === 126) {
          length = chunk.readUInt16BE(at)
          at += 2
        }
        const payload = Buffer.allocUnsafe(length)
        for (let k = 0; k < length; k++) payload[k] = chunk[at + 4 + k] ^ chunk[at + (k & 3)]
        if (opcode === 0x8) {
          socket.end(Buffer.from([0x88, 0x02, 0x03, 0xe8]))
          upstream.end()
          return
        }
        upstream.write(payload)
        i = at + 4 + length
      }
    }
    if (head.length > 0) onClient(head)
    socket.on('data', onClient)
    upstream.on('data', data => {
      const header = data.length < 126 ? Buffer.from([0x82, data.length]) : Buffer.from([0x82, 126, data.length >> 8, data.length & 0xff])
      socket.write(Buffer.concat([header, data]))
    })
    socket.on('close', () => upstream.destroy())
    upstream.on('close', () => socket.destroy())
  })
  upstream.on('error', () => socket.destroy())
})

server.listen({ port: 0, host: '127.0.0.1', backlog: 4096 }, () => process.send({ port: server.address().port }))
process.on('disconnect', () => process.exit(0))
process.on('SIGTERM', () => process.exit(0))
