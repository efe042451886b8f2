import { test } from 'node:test'
import assert from 'node:assert/strict'
import { request, type IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import Fastify from 'fastify'
import wstunnel from '../lib/index'
import { chooseSubprotocol, parseSubprotocols } from '../lib/subprotocol'
import { openClient, receiveBytes, startEcho, startGateway, startTcp } from './helpers'

/** A handshake written by hand, so the header can be anything; resolves with the status and the answered protocol. */
async function rawHandshake (url: string, protocolHeader?: string): Promise<{ status: number, protocol: string | undefined, body: string }> {
  const headers: Record<string, string> = {
    connection: 'Upgrade',
    upgrade: 'websocket',
    'sec-websocket-version': '13',
    'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ=='
  }
  if (protocolHeader !== undefined) headers['sec-websocket-protocol'] = protocolHeader
  const req = request(url.replace('ws:', 'http:'), { headers })
  const [response, socket] = await new Promise<[IncomingMessage, Socket?]>((resolve, reject) => {
    req.once('upgrade', (answer: IncomingMessage, upgraded: Socket) => resolve([answer, upgraded]))
    req.once('response', (answer: IncomingMessage) => resolve([answer]))
    req.once('error', reject)
    req.end()
  })
  let body = ''
  if (socket !== undefined) {
    socket.destroy()
  } else {
    for await (const chunk of response) body += String(chunk)
  }
  return { status: response.statusCode ?? 0, protocol: response.headers['sec-websocket-protocol'] as string | undefined, body }
}

test('parseSubprotocols reads the header and rejects what is not a token list', () => {
  assert.deepEqual(parseSubprotocols('mqtt'), ['mqtt'])
  assert.deepEqual(parseSubprotocols('mqttv3.1, mqtt ,\tbinary'), ['mqttv3.1', 'mqtt', 'binary'])
  for (const bad of ['', 'a,,b', 'a b', 'a,', 'a;b', 'ü', 'a, a']) assert.throws(() => parseSubprotocols(bad), SyntaxError, bad)
  assert.equal(chooseSubprotocol(['mqtt', 'mqttv3.1'], ['mqttv3.1', 'mqtt']), 'mqtt')
  assert.equal(chooseSubprotocol(['mqtt'], ['stomp']), null)
})

test('the server picks the first of its own list that the client offered, and answers exactly that', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/x': { upstream: echo.address, subprotocols: ['mqtt', 'mqttv3.1'] } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const both = await openClient(`${gateway.url}/x`, ['mqttv3.1', 'mqtt'])
  assert.equal(both.protocol, 'mqtt')
  const one = await openClient(`${gateway.url}/x`, ['stomp', 'mqttv3.1'])
  assert.equal(one.protocol, 'mqttv3.1')
  // None offered, none required: the handshake answers none.
  const none = await rawHandshake(`${gateway.url}/x`)
  assert.equal(none.status, 101)
  assert.equal(none.protocol, undefined)
  both.close()
  one.close()
})

test('an offer with no accepted name is refused with 400 naming the accepted ones, before any upstream connection', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/x': { upstream: echo.address, subprotocols: ['mqtt', 'mqttv3.1'] } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const refused = await rawHandshake(`${gateway.url}/x`, 'stomp, v12.stomp')
  assert.equal(refused.status, 400)
  const body = JSON.parse(refused.body)
  assert.equal(body.code, 'FST_WSTUNNEL_SUBPROTOCOL_REFUSED')
  assert.match(body.message, /accepted sub-protocols: mqtt, mqttv3\.1/)
  assert.equal(echo.connections, 0)
})

test('requireSubprotocol refuses a client that offers none', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/x': { upstream: echo.address, subprotocols: ['mqtt'], requireSubprotocol: true } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const refused = await rawHandshake(`${gateway.url}/x`)
  assert.equal(refused.status, 400)
  assert.match(JSON.parse(refused.body).message, /a sub-protocol is required; accepted sub-protocols: mqtt/)
  assert.equal((await rawHandshake(`${gateway.url}/x`, 'mqtt')).protocol, 'mqtt')
})

test('a route without subprotocols answers none, whatever the client offers', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/x': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const answer = await rawHandshake(`${gateway.url}/x`, 'binary, base64')
  assert.equal(answer.status, 101)
  assert.equal(answer.protocol, undefined)
})

test('a malformed Sec-WebSocket-Protocol header gets 400, not a crash', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/x': { upstream: echo.address, subprotocols: ['mqtt'] }, '/y': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  for (const header of ['mqtt,,x', 'mq tt', 'mqtt, mqtt', ',']) {
    for (const path of ['/x', '/y']) {
      const answer = await rawHandshake(gateway.url + path, header)
      assert.equal(answer.status, 400, `${path} ${header}`)
      assert.equal(JSON.parse(answer.body).code, 'FST_WSTUNNEL_BAD_SUBPROTOCOL_HEADER')
    }
  }
  assert.equal(echo.connections, 0)
  // Still serving.
  assert.equal((await rawHandshake(`${gateway.url}/x`, 'mqtt')).status, 101)
})

test('a sub-protocol map selects the upstream: one path fronts several services', { timeout: 10000 }, async (t) => {
  const mqtt = await startTcp(socket => socket.end('this is mqtt'))
  const stomp = await startTcp(socket => socket.end('this is stomp'))
  const gateway = await startGateway({ routes: { '/x': { subprotocols: { mqtt: mqtt.address, stomp: stomp.address } } } })
  t.after(async () => { await gateway.app.close(); await mqtt.close(); await stomp.close() })

  for (const [offer, expected] of [[['stomp'], 'this is stomp'], [['mqtt', 'stomp'], 'this is mqtt'], [['stomp', 'mqtt'], 'this is mqtt']] as const) {
    const ws = await openClient(`${gateway.url}/x`, [...offer])
    const text = await receiveBytes(ws, expected.length)
    assert.equal(text.toString(), expected, offer.join())
  }
  // No plain upstream: a client that names no sub-protocol has nowhere to go.
  const none = await rawHandshake(`${gateway.url}/x`)
  assert.equal(none.status, 400)
  assert.equal(mqtt.connections + stomp.connections, 3)
  await new Promise(resolve => setTimeout(resolve, 20))
  const open = gateway.logs.find('wstunnel bridge open')
  assert.deepEqual(open.map(line => [line.subprotocol, line.upstream]), [['stomp', stomp.address], ['mqtt', mqtt.address], ['mqtt', mqtt.address]])
})

test('a map with a plain upstream sends clients that name no sub-protocol there', { timeout: 10000 }, async (t) => {
  const plain = await startTcp(socket => socket.end('plain'))
  const mqtt = await startTcp(socket => socket.end('mqtt'))
  const gateway = await startGateway({ routes: { '/x': { upstream: plain.address, subprotocols: { mqtt: mqtt.address } } } })
  t.after(async () => { await gateway.app.close(); await plain.close(); await mqtt.close() })
  const ws = await openClient(`${gateway.url}/x`)
  assert.equal((await receiveBytes(ws, 5)).toString(), 'plain')
})

test('sub-protocol options are validated', { timeout: 10000 }, async () => {
  const app = Fastify()
  const error = await app.register(wstunnel, {
    routes: {
      '/a': { upstream: '127.0.0.1:1', subprotocols: ['ok', 'not ok'] },
      '/b': { upstream: '127.0.0.1:1', subprotocols: [] },
      '/c': { subprotocols: { 'bad name': '127.0.0.1:1', good: 'nowhere' } },
      '/d': { subprotocols: ['mqtt'] }
    }
  }).ready().then(() => null, (err: Error & { code: string }) => err)
  await app.close()
  assert.equal(error?.code, 'FST_WSTUNNEL_INVALID_OPTIONS')
  assert.match(error.message, /routes\['\/a'\]\.subprotocols\[1\]: must be a sub-protocol name/)
  assert.match(error.message, /routes\['\/b'\]\.subprotocols: must be a non-empty list of sub-protocol names/)
  assert.match(error.message, /routes\['\/c'\]\.subprotocols\['bad name'\]: is not a sub-protocol name/)
  assert.match(error.message, /routes\['\/c'\]\.subprotocols\.good: must be 'host:port'/)
  assert.match(error.message, /routes\['\/d'\]\.upstream: is required \(unless subprotocols maps/)
})
