import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { spawn } from 'node:child_process'
import { connect } from 'node:net'
import websocket from '@fastify/websocket'
import { closed, openClient, startEcho, startGateway, waitFor } from './helpers'
import { CLOSE, openRaw } from './raw-client'

// fastify.close() must end in bounded time whatever the handshakes and clients in flight are doing.

/** An upstream whose accept queue is full: connects to it wait (the kernel drops their SYNs). A child
 *  process that listens with a backlog of 1 and stops itself, so it never accepts. */
async function startUnresponsive (): Promise<{ address: string, stop: () => void }> {
  const child = spawn(process.execPath, ['-e', `const server = require('node:net').createServer()
    server.listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => {
      process.send(server.address().port, () => process.kill(process.pid, 'SIGSTOP'))
    })`], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const [port] = await once(child, 'message') as [number]
  // Fill the accept queue (backlog + 1) so that the next connect hangs.
  const fillers = [connect(port, '127.0.0.1'), connect(port, '127.0.0.1')]
  await Promise.all(fillers.map(socket => once(socket, 'connect')))
  return {
    address: `127.0.0.1:${port}`,
    stop: () => { for (const socket of fillers) socket.destroy(); child.kill('SIGKILL') }
  }
}

test('close() answers a handshake still connecting its upstream with 503, and aborts the connect', { timeout: 10000 }, async (t) => {
  const upstream = await startUnresponsive()
  t.after(upstream.stop)
  const gateway = await startGateway({ routes: { '/slow': { upstream: upstream.address, connectTimeout: 30000 } } })
  t.after(() => gateway.app.close())

  const refused = openClient(`${gateway.url}/slow`).then(() => null, (err: { statusCode?: number }) => err)
  await new Promise(resolve => setTimeout(resolve, 200)) // the gateway is now waiting for the upstream
  await gateway.app.close()
  assert.equal((await refused)?.statusCode, 503)
})

test('many handshakes waiting for their upstream at once raise no listener warning, and all get 503 on close()', { timeout: 10000 }, async (t) => {
  const warnings: string[] = []
  const onWarning = (warning: Error): void => { warnings.push(warning.name) }
  process.on('warning', onWarning)
  t.after(() => { process.removeListener('warning', onWarning) })
  const upstream = await startUnresponsive()
  t.after(upstream.stop)
  const gateway = await startGateway({ routes: { '/slow': { upstream: upstream.address, connectTimeout: 30000 } } })
  t.after(() => gateway.app.close())

  const refused = Array.from({ length: 20 }, () => openClient(`${gateway.url}/slow`).then(() => null, (err: { statusCode?: number }) => err.statusCode))
  await new Promise(resolve => setTimeout(resolve, 300))
  await gateway.app.close()
  assert.deepEqual(await Promise.all(refused), new Array(20).fill(503))
  assert.deepEqual(warnings.filter(name => name === 'MaxListenersExceededWarning'), [])
})

test('a handshake that upgrades after close() began is closed with 1001, and close() ends', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  t.after(() => echo.close())
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } }, async (app) => {
    await app.register(websocket, {
      // The upgrade completes 300 ms after the upstream connected; this preClose leaves the server open.
      options: { verifyClient: (_info: unknown, done: (ok: boolean) => void) => { setTimeout(() => done(true), 300) } },
      preClose: (done) => { done() }
    })
  })
  const opening = openClient(`${gateway.url}/echo`)
  await waitFor(() => echo.connections === 1)
  const closing = gateway.app.close()
  const client = await opening
  assert.equal((await closed(client)).code, 1001)
  await closing
})

test('a client that never answers its 1001 is cut off after closeTimeout, so close() ends', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  t.after(() => echo.close())
  const gateway = await startGateway({ closeTimeout: 300, routes: { '/echo': { upstream: echo.address } } })
  const client = await openRaw(`${gateway.url}/echo`, { allowHalfOpen: true })
  t.after(() => client.socket.destroy())
  await waitFor(() => gateway.app.wstunnel.connections === 1)
  await gateway.app.close() // the raw client reads the 1001 and answers nothing
  const close = client.frames.find(f => f.opcode === CLOSE)
  assert.equal(close?.payload.readUInt16BE(0), 1001)
  await waitFor(() => client.ended)
})
