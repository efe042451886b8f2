'use strict'

// The upstream test servers, in a process of their own: echo (writes back what it reads), source (writes
// 64 KiB chunks as fast as the reader takes them, until it goes) and sink (reads and counts).
// The parent learns the ports from the first IPC message and asks for the sink's byte count with 'sinkBytes'.
const net = require('node:net')

const CHUNK = Buffer.alloc(64 * 1024, 'x')
let sinkBytes = 0

function listen (onSocket) {
  const server = net.createServer(onSocket)
  server.maxConnections = 20000
  return new Promise(resolve => server.listen({ port: 0, host: '127.0.0.1', backlog: 4096 }, () => resolve(server)))
}

function echo (socket) {
  socket.setNoDelay(true)
  socket.on('error', () => socket.destroy())
  socket.pipe(socket)
}

function source (socket) {
  socket.on('error', () => socket.destroy())
  socket.resume()
  const pump = () => {
    // Bounded: each turn writes until the socket buffers, then waits for 'drain'; it stops when the reader goes.
    while (!socket.destroyed && socket.write(CHUNK));
  }
  socket.on('drain', pump)
  pump()
}

function sink (socket) {
  socket.on('error', () => socket.destroy())
  socket.on('data', chunk => { sinkBytes += chunk.length })
}

async function main () {
  const [e, s, k] = await Promise.all([listen(echo), listen(source), listen(sink)])
  process.on('message', message => {
    if (message === 'sinkBytes') process.send({ sinkBytes })
  })
  process.on('disconnect', () => process.exit(0))
  process.send({ echo: e.address().port, source: s.address().port, sink: k.address().port })
}

main()
