import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import type { Socket } from 'node:net'
import { closed, openClient, texts, readBytes, receiveBytes, startEcho, startGateway, startTcp, waitFor } from './helpers'

test('bytes from client messages reach the upstream in order, and upstream bytes come back in order', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const ws = await openClient(`${gateway.url}/echo`)
  const expected: Buffer[] = []
  for (let i = 0; i < 500; i++) expected.push(Buffer.from(`message ${i};`))
  const total = Buffer.concat(expected)
  const received = receiveBytes(ws, total.length)
  for (const message of expected) ws.send(message)
  assert.deepEqual(await received, total)
  ws.close()
})

test('messages sent right after the upgrade are not lost', { timeout: 10000 }, async (t) => {
  const sink = await startTcp()
  const gateway = await startGateway({ routes: { '/sink': { upstream: sink.address } } })
  t.after(async () => { await gateway.app.close(); await sink.close() })

  const upstreamSocket = sink.nextSocket()
  const ws = await openClient(`${gateway.url}/sink`)
  // Sent in the same tick as 'open': the gateway must already be listening.
  for (let i = 0; i < 50; i++) ws.send(`${i},`)
  const expected = Array.from({ length: 50 }, (_, i) => `${i},`).join('')
  const bytes = await readBytes(await upstreamSocket, expected.length)
  assert.equal(bytes.toString(), expected)
  ws.close()
})

test('binary routes send upstream bytes as binary messages', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const ws = await openClient(`${gateway.url}/echo`)
  ws.send('hello')
  const [data, isBinary] = await once(ws, 'message') as [Buffer, boolean]
  assert.equal(isBinary, true)
  assert.equal(data.toString(), 'hello')
  ws.close()
})

test('text routes never split a character that TCP split, and write client text as UTF-8 bytes', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket })
  const gateway = await startGateway({ routes: { '/text': { upstream: server.address, frame: 'text' } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/text`)
  await waitFor(() => upstream !== undefined)
  const messages: Array<{ text: string, isBinary: boolean }> = []
  ws.on('message', (data: Buffer, isBinary: boolean) => messages.push({ text: data.toString(), isBinary }))

  const text = 'héllo wörld €uro 𝄞 日本語'
  const bytes = Buffer.from(text)
  // One byte per TCP write, with a pause, so every multi-byte character is cut across reads.
  for (const byte of bytes) {
    upstream!.write(Buffer.from([byte]))
    await new Promise(resolve => setTimeout(resolve, 2))
  }
  await waitFor(() => messages.map(m => m.text).join('') === text)
  for (const message of messages) {
    assert.equal(message.isBinary, false)
    assert.ok(!message.text.includes('\ufffd'), `message ${JSON.stringify(message.text)} holds a replacement character`)
  }

  const fromClient = readBytes(upstream!, Buffer.byteLength('ünïcødé ✓'))
  ws.send('ünïcødé ✓')
  assert.deepEqual(await fromClient, Buffer.from('ünïcødé ✓'))
  ws.close()
})

test('text routes close with 1007 when the upstream sends invalid UTF-8, and log it', { timeout: 10000 }, async (t) => {
  const server = await startTcp(socket => socket.write(Buffer.from([0x68, 0x69, 0xff, 0xfe])))
  const gateway = await startGateway({ routes: { '/text': { upstream: server.address, frame: 'text' } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/text`)
  const { code } = await closed(ws)
  assert.equal(code, 1007)
  await waitFor(() => gateway.logs.lines.some(line => /not UTF-8/.test(String(line.msg))))
})

test('text routes close with 1007 when the upstream ends in the middle of a character', { timeout: 10000 }, async (t) => {
  const server = await startTcp(socket => socket.end(Buffer.from([0x61, 0xe2, 0x82])))
  const gateway = await startGateway({ routes: { '/text': { upstream: server.address, frame: 'text' } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/text`)
  const { code } = await closed(ws)
  assert.equal(code, 1007)
  assert.deepEqual(texts(ws), ['a'])
})

test("invalidUtf8: 'replace' turns bad upstream bytes into U+FFFD and keeps the connection", { timeout: 10000 }, async (t) => {
  const server = await startTcp(socket => socket.end(Buffer.from([0x6f, 0x6b, 0xff, 0x21, 0xe2, 0x82])))
  const gateway = await startGateway({ routes: { '/text': { upstream: server.address, frame: 'text', invalidUtf8: 'replace' } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/text`)
  const { code } = await closed(ws)
  assert.equal(code, 1000)
  assert.equal(texts(ws).join(''), 'ok\ufffd!\ufffd')
})

test('a client text message that is not UTF-8 is closed with 1007 and never reaches the upstream', { timeout: 10000 }, async (t) => {
  const received: Buffer[] = []
  const server = await startTcp(socket => socket.on('data', (chunk: Buffer) => received.push(chunk)))
  const gateway = await startGateway({ routes: { '/text': { upstream: server.address, frame: 'text' } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/text`)
  ws.send(Buffer.from([0xc3, 0x28]), { binary: false })
  const { code } = await closed(ws)
  assert.equal(code, 1007)
  await new Promise(resolve => setTimeout(resolve, 50))
  assert.equal(Buffer.concat(received).length, 0)
})

test('an upstream that speaks first (a VNC or SMTP banner) is heard', { timeout: 10000 }, async (t) => {
  // The banner is written the moment the gateway connects, while the client's handshake is still being answered.
  const server = await startTcp(socket => {
    socket.write('RFB 003.008\n')
    socket.pipe(socket)
  })
  const gateway = await startGateway({ routes: { '/vnc': { upstream: server.address } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/vnc`)
  assert.equal((await receiveBytes(ws, 12)).toString(), 'RFB 003.008\n')
  ws.send('RFB 003.008\n')
  assert.equal((await receiveBytes(ws, 24)).subarray(12).toString(), 'RFB 003.008\n')
  ws.close()
})

test('messages that arrive together with the close frame reach the upstream, in order, before its FIN', { timeout: 10000 }, async (t) => {
  const sink = await startTcp()
  const gateway = await startGateway({ routes: { '/sink': { upstream: sink.address } } })
  t.after(async () => { await gateway.app.close(); await sink.close() })

  const upstreamSocket = sink.nextSocket()
  const ws = await openClient(`${gateway.url}/sink`)
  const upstream = await upstreamSocket
  const chunks: Buffer[] = []
  upstream.on('data', (chunk: Buffer) => chunks.push(chunk))
  const ended = once(upstream, 'end')
  // Small messages, then a large one, then the close: all in one burst from the client.
  const expected: Buffer[] = []
  for (let i = 0; i < 200; i++) expected.push(Buffer.from(`${i};`))
  expected.push(Buffer.alloc(100 * 1024, 'z'))
  for (const message of expected) ws.send(message)
  ws.close(1000)
  await ended
  assert.deepEqual(Buffer.concat(chunks), Buffer.concat(expected))
})
