import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import type { Socket } from 'node:net'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import { startEcho, startGateway, startTcp, waitFor } from './helpers'

// The gap between the upstream connect (before the upgrade) and the bridge adopting the upstream (after it):
// whatever happens there must neither crash the process nor leak a connection.

/** How a handshake ended: closed with a code after opening, or refused with an HTTP status. */
function outcome (ws: WebSocket): Promise<{ opened: boolean, code?: number, status?: number }> {
  return new Promise(resolve => {
    let opened = false
    ws.once('open', () => { opened = true })
    ws.once('unexpected-response', (_request, response) => {
      resolve({ opened, status: response.statusCode })
      ws.terminate()
    })
    ws.on('error', () => {})
    ws.once('close', (code: number) => resolve({ opened, code }))
  })
}

test('an upstream reset while the upgrade completes closes the client with 1011, and the process survives', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => {
    if (upstream !== undefined) return socket.pipe(socket) // later connections echo
    upstream = socket
    // Inside the 200 ms the upgrade is held: the upstream is connected, the bridge not yet open.
    setTimeout(() => socket.resetAndDestroy(), 50)
  })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address } } }, async (app) => {
    await app.register(websocket, { options: { verifyClient: (_info, done) => { setTimeout(() => done(true), 200) } } })
  })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = new WebSocket(`${gateway.url}/x`)
  t.after(() => { ws.terminate() })
  const result = await outcome(ws)
  assert.ok(upstream?.destroyed, 'the upstream was connected and reset')
  if (result.status === undefined) {
    assert.deepEqual(result, { opened: true, code: 1011 })
  } else {
    assert.ok(result.status >= 500, `refused with ${result.status}`)
  }
  assert.equal(gateway.app.wstunnel.connections, 0)
  assert.equal(gateway.logs.find('wstunnel bridge open').length, 0)
  // The gateway still bridges.
  const next = new WebSocket(`${gateway.url}/x`)
  t.after(() => { next.terminate() })
  await once(next, 'open')
  const echoed = once(next, 'message') as Promise<[Buffer]>
  next.send('still here')
  assert.equal((await echoed)[0].toString(), 'still here')
})

test('a bridge that fails to open closes its upstream and its client, and the process survives', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  let upstreamClosed = false
  const server = await startTcp(socket => {
    upstream = socket
    socket.on('close', () => { upstreamClosed = true })
  })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address } } }, async (app) => {
    await app.register(websocket)
    // The Bridge constructor's first listener on the WebSocket ('close', or 'message' where ws reads the
    // frames) throws: the bridge has adopted nothing yet.
    app.websocketServer.on('connection', (ws: WebSocket) => {
      const on = ws.on
      let thrown = false
      ws.on = function (this: WebSocket, event: string, listener: (...args: unknown[]) => void) {
        if (!thrown && (event === 'close' || event === 'message')) {
          thrown = true
          throw new Error('boom')
        }
        return on.call(this, event, listener)
      } as WebSocket['on']
    })
  })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = new WebSocket(`${gateway.url}/x`)
  t.after(() => { ws.terminate() })
  const result = await outcome(ws)
  assert.notEqual(result.code, undefined, 'the client was closed')
  assert.ok(upstream !== undefined, 'the upstream was connected')
  await waitFor(() => upstreamClosed)
  assert.equal(server.sockets.size, 0, 'the gateway closed the upstream')
  assert.equal(gateway.app.wstunnel.connections, 0)
  assert.equal(gateway.logs.find('wstunnel bridge failed to open').length, 1)
})

test('app.injectWS() on a bridged route: a message goes to the upstream and comes back', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const ws = await gateway.app.injectWS('/echo')
  t.after(() => { ws.terminate() })
  const message = once(ws, 'message') as Promise<[Buffer]>
  ws.send('hello through injectWS')
  const [data] = await message
  assert.equal(data.toString(), 'hello through injectWS')
  assert.equal(gateway.app.wstunnel.connections, 1)
  // injectWS's in-memory stream only reports 'close' to the server side when destroyed (a closing
  // handshake leaves it open until ws's 30 s close timer), so the client goes away abruptly.
  ws.terminate()
  await waitFor(() => gateway.app.wstunnel.connections === 0 && echo.sockets.size === 0)
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
})

test('with ws clientTracking off (an app that registered @fastify/websocket so), bridges open and leak nothing', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } }, async (app) => {
    await app.register(websocket, { options: { clientTracking: false } })
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const ws = new WebSocket(`${gateway.url}/echo`)
  await once(ws, 'open')
  ws.send('ping')
  const [data] = await once(ws, 'message') as [Buffer]
  assert.equal(data.toString(), 'ping')
  ws.close()
  await waitFor(() => gateway.app.wstunnel.connections === 0 && echo.sockets.size === 0)
})
