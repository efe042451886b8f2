import { test } from 'node:test'
import assert from 'node:assert/strict'
import type { Page } from 'playwright-core'
import { launchChromium } from './browser'
import { startGateway, startTcp, waitFor, type Gateway, type TcpServer } from './helpers'

/** What a page's WebSocket did: whether it opened, the answered sub-protocol, the bytes and how it ended. */
interface Outcome {
  opened: boolean
  protocol: string
  bytes: number[]
  allBinary: boolean
  errored: boolean
  closeCode: number | null
}

/** A TCP server that greets each connection with `greeting`, then echoes. */
function startGreeter (greeting: string): Promise<TcpServer> {
  return startTcp(socket => {
    socket.write(greeting)
    socket.pipe(socket)
  })
}

/** The HTTP status the gateway answered to the last request for `url`, from its log; undefined if it logged none. */
function lastStatus (gateway: Gateway, url: string): unknown {
  const request = gateway.logs.find('incoming request').filter(line => (line.req as { url?: string }).url === url).at(-1)
  const completed = gateway.logs.find('request completed').find(line => line.reqId === request?.reqId)
  return (completed?.res as { statusCode?: number } | undefined)?.statusCode
}

/** Opens a WebSocket in the page, sends `message` once open, and closes once `bytes` have arrived (or after `timeout` ms).
 * Resolves with what the socket did. */
function openInPage (page: Page, url: string, protocols: string[], message: number[], bytes: number): Promise<Outcome> {
  // Runs in the browser: no helpers from this file, only what the page has.
  return page.evaluate(({ url, protocols, message, bytes, timeout }) => new Promise<Outcome>(resolve => {
    const outcome: Outcome = { opened: false, protocol: '', bytes: [], allBinary: true, errored: false, closeCode: null }
    const ws = new WebSocket(url, protocols)
    ws.binaryType = 'arraybuffer'
    const timer = setTimeout(() => { ws.close(); resolve(outcome) }, timeout)
    ws.onopen = () => {
      outcome.opened = true
      outcome.protocol = ws.protocol
      ws.send(new Uint8Array(message))
    }
    ws.onmessage = (event: MessageEvent) => {
      if (!(event.data instanceof ArrayBuffer)) outcome.allBinary = false
      const data = event.data instanceof ArrayBuffer ? new Uint8Array(event.data) : new TextEncoder().encode(String(event.data))
      for (const byte of data) outcome.bytes.push(byte)
      if (outcome.bytes.length >= bytes) ws.close(1000)
    }
    ws.onerror = () => { outcome.errored = true }
    ws.onclose = (event: CloseEvent) => {
      outcome.closeCode = event.code
      clearTimeout(timer)
      resolve(outcome)
    }
  }), { url, protocols, message, bytes, timeout: 5000 })
}

test('a browser reaches the upstream its token names, from a sub-protocol entry or a cookie; an unknown token never connects', { timeout: 30000 }, async (t) => {
  const a = await startGreeter('A\n')
  t.after(() => a.close())
  const b = await startGreeter('B\n')
  t.after(() => b.close())
  const tokens = { vm1: a.address, vm2: b.address }
  const gateway = await startGateway({
    routes: {
      '/vm': { target: { from: 'token', tokens, source: ['subprotocol'] }, subprotocols: ['binary'] },
      '/vm-cookie': { target: { from: 'token', tokens, source: ['cookie'] } }
    }
  }, app => {
    // The page's origin is the gateway, so the cookie it sets goes with its WebSocket handshakes.
    app.get('/', (_request, reply) => { reply.type('text/html').send('<!doctype html><link rel="icon" href="data:,"><title>wstunnel</title>') })
  })
  t.after(() => gateway.app.close())
  const browser = await launchChromium()
  t.after(() => browser.close())
  const page = await browser.newPage()
  page.setDefaultTimeout(5000)
  const home = await page.goto(gateway.url.replace(/^ws:/, 'http:') + '/')
  assert.equal(home?.status(), 200)

  // Bytes that are not UTF-8, so a text frame or a decoding step anywhere would show.
  const message = [0x00, 0x01, 0xfe, 0xff, 0x80, 0x0a]
  const expect = (greeting: string): number[] => [...Buffer.from(greeting), ...message]

  const bySubprotocol = await openInPage(page, `${gateway.url}/vm`, ['binary', 'token.vm2'], message, 2 + message.length)
  assert.equal(bySubprotocol.opened, true, 'the sub-protocol token route opens')
  assert.equal(bySubprotocol.protocol, 'binary', 'the token entry is never the answer')
  assert.deepEqual(bySubprotocol.bytes, expect('B\n'))
  assert.equal(bySubprotocol.allBinary, true)
  assert.equal(bySubprotocol.closeCode, 1000)
  assert.deepEqual([a.connections, b.connections], [0, 1])

  await page.evaluate(() => { document.cookie = 'token=vm1; path=/' })
  const byCookie = await openInPage(page, `${gateway.url}/vm-cookie`, [], message, 2 + message.length)
  assert.equal(byCookie.opened, true, 'the cookie token route opens')
  assert.equal(byCookie.protocol, '')
  assert.deepEqual(byCookie.bytes, expect('A\n'))
  assert.equal(byCookie.closeCode, 1000)
  assert.deepEqual([a.connections, b.connections], [1, 1])

  // The gateway answers 404 before the upgrade; the browser only sees a failed handshake.
  const unknown = await openInPage(page, `${gateway.url}/vm`, ['binary', 'token.nope'], message, 1)
  assert.deepEqual(unknown, { opened: false, protocol: '', bytes: [], allBinary: true, errored: true, closeCode: 1006 })
  // Logged when the answer has been sent, which the browser may have seen first.
  await waitFor(() => lastStatus(gateway, '/vm') !== undefined)
  assert.equal(lastStatus(gateway, '/vm'), 404)
  assert.deepEqual([a.connections, b.connections], [1, 1])
})
