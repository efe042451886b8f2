import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import websocket from '@fastify/websocket'
import { closed, openClient, receiveBytes, startGateway, startTcp, waitFor } from './helpers'

// An app may register @fastify/websocket itself, with permessage-deflate on. A connection that negotiated it
// carries compressed frames (RSV1 set): they are ws's to inflate, and the bridge must not refuse them.

test('with permessage-deflate negotiated, compressed binary and text messages pass both ways intact', { timeout: 20000 }, async (t) => {
  const chunks: Buffer[] = []
  const echo = await startTcp(socket => {
    socket.on('data', (chunk: Buffer) => {
      chunks.push(chunk)
      socket.write(chunk)
    })
  })
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } }, async (app) => {
    await app.register(websocket, { options: { perMessageDeflate: true } })
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  // threshold 0: every message is compressed, however small.
  const ws = await openClient(`${gateway.url}/echo`, undefined, { perMessageDeflate: { threshold: 0 } })
  t.after(() => { ws.terminate() })
  assert.match(ws.extensions, /permessage-deflate/, 'the extension was negotiated')
  let closedWith: string | null = null
  ws.on('close', (code: number, reason: Buffer) => { closedWith = `${code} ${reason.toString()}` })

  const messages: Array<{ data: Buffer, binary: boolean }> = [
    { data: randomBytes(10), binary: true },
    { data: Buffer.from('small text: naïve ☃'), binary: false },
    { data: randomBytes(200 * 1024), binary: true }, // incompressible
    { data: Buffer.from('compressible text, with ü and 😀; '.repeat(6000)), binary: false } // about 200 KB
  ]
  for (const { data, binary } of messages) ws.send(binary ? data : data.toString(), { binary })
  const expected = Buffer.concat(messages.map(message => message.data))

  await waitFor(() => Buffer.concat(chunks).length >= expected.length || closedWith !== null, 10000)
  assert.equal(closedWith, null, 'the gateway did not close the connection')
  assert.ok(Buffer.concat(chunks).equals(expected), 'the upstream received exactly the bytes sent')
  const echoed = await receiveBytes(ws, expected.length)
  assert.ok(echoed.equals(expected), 'the client got the same bytes back')

  ws.close(1000, 'done')
  assert.deepEqual(await closed(ws), { code: 1000, reason: 'done' })
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  const line = gateway.logs.find('wstunnel bridge closed')[0]
  assert.deepEqual([line.code, line.closedBy], [1000, 'client'])
  assert.equal(line.clientToUpstream, expected.length)
})
