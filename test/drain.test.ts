import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import type { Socket } from 'node:net'
import { closed, listeningAt, openClient, receiveBytes, startGateway, startTcp, waitFor } from './helpers'

/** Writes `bytes` to the socket and resolves once the kernel has taken them all. */
function writeAll (socket: Socket, bytes: Buffer): Promise<void> {
  return new Promise(resolve => socket.write(bytes, () => { resolve() }))
}

test('on close, bytes the upstream wrote before it reach the client, then 1001; closeCode 1012 says the server comes back', { timeout: 20000 }, async (t) => {
  for (const closeCode of [1001, 1012] as const) {
    let upstream: Socket | undefined
    const server = await startTcp(socket => { upstream = socket; socket.resume() })
    t.after(() => server.close())
    const gateway = await startGateway({ closeCode, drainTimeout: 2000, routes: { '/s': { upstream: server.address } } })
    const ws = await openClient(`${gateway.url}/s`)
    await waitFor(() => upstream !== undefined)
    // Written in pieces, the last one just before the close: none of it may be lost.
    const pieces = Array.from({ length: 20 }, () => randomBytes(50000))
    for (const piece of pieces) await writeAll(upstream!, piece)
    const closedWith = closed(ws)
    await gateway.app.close()
    const expected = Buffer.concat(pieces)
    const received = Buffer.concat(ws.inbox.map(message => message.data))
    assert.equal(received.length, expected.length, `closeCode ${closeCode}: every byte before the close arrived`)
    assert.ok(received.equals(expected))
    const { code, reason } = await closedWith
    assert.equal(code, closeCode)
    assert.equal(reason, closeCode === 1012 ? 'service restart' : 'server shutting down')
  }
})

test('drainTimeout bounds a drain whose upstream never goes quiet', { timeout: 20000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket; socket.resume() })
  t.after(() => server.close())
  const gateway = await startGateway({ drainTimeout: 300, routes: { '/s': { upstream: server.address } } })
  const ws = await openClient(`${gateway.url}/s`)
  await waitFor(() => upstream !== undefined)
  const stream = setInterval(() => { upstream?.write('x'.repeat(100)) }, 5)
  t.after(() => { clearInterval(stream) })
  const started = Date.now()
  const closedWith = closed(ws)
  await gateway.app.close()
  const took = Date.now() - started
  assert.equal((await closedWith).code, 1001)
  assert.ok(took >= 250 && took < 3000, `close took ${took} ms`)
  assert.ok(ws.inbox.length > 0)
})

test('SIGTERM to the command mid-stream: every byte the upstream wrote before the signal reaches the client, then 1001', { timeout: 30000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket; socket.resume() })
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-drain-'))
  const config = join(dir, 'gateway.json')
  writeFileSync(config, JSON.stringify({ listen: { port: 0, host: '127.0.0.1' }, routes: { '/s': { upstream: server.address } } }))
  const child = spawn(process.execPath, [join(__dirname, '..', 'bin', 'fastify-wstunnel.js'), '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] })
  t.after(async () => {
    child.kill('SIGKILL')
    await server.close()
    rmSync(dir, { recursive: true, force: true })
  })
  const base = await listeningAt(child)

  const ws = await openClient(`${base.replace('http', 'ws')}/s`)
  await waitFor(() => upstream !== undefined)
  const pieces = Array.from({ length: 40 }, () => randomBytes(30000))
  for (const piece of pieces) await writeAll(upstream!, piece)
  const closedWith = closed(ws)
  child.kill('SIGTERM')
  const expected = Buffer.concat(pieces)
  const received = await receiveBytes(ws, expected.length)
  assert.ok(received.equals(expected), 'every byte written before the signal, in order')
  assert.equal((await closedWith).code, 1001)
  const [code] = await once(child, 'exit') as [number | null]
  assert.equal(code, 0)
})

test('a draining client is not taken for dead by the heartbeat: it still gets 1001', { timeout: 20000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket; socket.resume() })
  t.after(() => server.close())
  const gateway = await startGateway({ drainTimeout: 1500, pingInterval: 200, routes: { '/s': { upstream: server.address } } })
  const ws = await openClient(`${gateway.url}/s`)
  await waitFor(() => upstream !== undefined)
  const stream = setInterval(() => { upstream?.write('x') }, 10) // never quiet: drains for all of drainTimeout
  t.after(() => { clearInterval(stream) })
  const closedWith = closed(ws)
  await gateway.app.close()
  assert.equal((await closedWith).code, 1001)
})

test('a drain waits for a slow client to take what its paused upstream still has, within drainTimeout', { timeout: 20000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket; socket.resume() })
  t.after(() => server.close())
  const gateway = await startGateway({ drainTimeout: 5000, routes: { '/s': { upstream: server.address } } })
  const ws = await openClient(`${gateway.url}/s`)
  await waitFor(() => upstream !== undefined)
  const client = (ws as unknown as { _socket: Socket })._socket
  client.pause() // the client stops reading: the gateway fills its 512 KiB and stops reading the upstream
  const payload = randomBytes(24 * 1024 * 1024)
  const written = writeAll(upstream!, payload) // more than the gateway and the kernel buffers hold
  await new Promise(resolve => setTimeout(resolve, 300))
  const closing = gateway.app.close()
  await new Promise(resolve => setTimeout(resolve, 300)) // past the 50 ms quiet check, with the client still paused
  client.resume()
  await written
  const received = await receiveBytes(ws, payload.length)
  assert.ok(received.equals(payload), 'everything the upstream wrote reached the client')
  await closing
})

test('after close() resolves, every bridge has logged its close line, also one whose client never answered', { timeout: 20000 }, async (t) => {
  const echo = await startTcp(socket => { socket.resume() })
  t.after(() => echo.close())
  const gateway = await startGateway({ drainTimeout: 0, closeTimeout: 300, routes: { '/s': { upstream: echo.address } } })
  const answering = await openClient(`${gateway.url}/s`)
  const silent = await openClient(`${gateway.url}/s`)
  ;(silent as unknown as { _socket: Socket })._socket.pause() // never reads the close frame, never answers it
  await gateway.app.close()
  assert.equal(gateway.logs.find('wstunnel bridge closed').length, 2)
  answering.terminate()
  silent.terminate()
})
