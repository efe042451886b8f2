'use strict'

const net = require('node:net')

/** Starts a TCP echo server on 127.0.0.1; resolves with the server once it listens. */
function startEchoServer (port = 0) {
  const server = net.createServer(socket => {
    socket.on('error', () => {})
    socket.pipe(socket)
  })
  return listen(server, port)
}

/** Starts a line-based TCP chat room on 127.0.0.1: every line a member sends goes to every member. */
function startChatServer (port = 0) {
  const members = new Set()
  let joined = 0
  const server = net.createServer(socket => {
    const name = `guest${++joined}`
    let pending = ''
    socket.setEncoding('utf8')
    socket.on('error', () => {})
    const broadcast = text => { for (const member of members) member.write(text) }
    socket.write(`* welcome, you are ${name}\n`)
    broadcast(`* ${name} joined\n`)
    members.add(socket)
    socket.on('data', chunk => {
      const lines = (pending + chunk).split('\n')
      pending = lines.pop()
      for (const line of lines) if (line.trim() !== '') broadcast(`${name}: ${line.trim()}\n`)
    })
    socket.on('close', () => {
      members.delete(socket)
      broadcast(`* ${name} left\n`)
    })
  })
  return listen(server, port)
}

function listen (server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, '127.0.0.1', () => resolve(server))
  })
}

module.exports = { startEchoServer, startChatServer }
