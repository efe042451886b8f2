import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Socket } from 'node:net'
import type { TLSSocket } from 'node:tls'
import Fastify from 'fastify'
import wstunnel from '../lib/index'
import { openClient, receiveBytes, startEcho } from './helpers'

// A self-signed certificate for localhost and 127.0.0.1, made for these tests with openssl.
const key = readFileSync(join(__dirname, 'fixtures', 'localhost-key.pem'))
const cert = readFileSync(join(__dirname, 'fixtures', 'localhost-cert.pem'))

test('over TLS (wss://) the bridge carries the exact bytes both ways, reading the client the stream way', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const app = Fastify({ https: { key, cert } })
  let server: Socket | undefined
  app.server.on('secureConnection', (socket: TLSSocket) => { server = socket })
  await app.register(wstunnel, { routes: { '/echo': { upstream: echo.address } } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.after(async () => { await app.close(); await echo.close() })
  const { port } = app.server.address() as { port: number }

  const ws = await openClient(`wss://127.0.0.1:${port}/echo`, undefined, { ca: cert })
  // Small messages, one cut across TLS records, and one larger than a read.
  const messages = [randomBytes(10), randomBytes(300), randomBytes(70000), randomBytes(5)]
  for (const message of messages) ws.send(message)
  const expected = Buffer.concat(messages)
  const received = await receiveBytes(ws, expected.length)
  assert.ok(received.equals(expected), 'the client got back exactly what it sent, in order')

  const onread = Object.getOwnPropertySymbols(server).find(symbol => symbol.description === 'kBufferCb') as symbol
  assert.equal((server as unknown as Record<symbol, unknown>)[onread], null, 'a TLS socket is not switched to the shared buffer')
  ws.close()
})
