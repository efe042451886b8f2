'use strict'

// A gateway on http://127.0.0.1:8080 with built-in TCP backends (two echo servers balanced round-robin,
// a chat room) and a page that uses them and shows the upstreams' state.
// PORT and HOST override where it listens.
const { readFileSync } = require('node:fs')
const { join } = require('node:path')
const Fastify = require('fastify')
const closeWithGrace = require('close-with-grace')
const wstunnel = require('..')
const { startEchoServer, startChatServer } = require('./backends')

async function main () {
  const echoes = [await startEchoServer(), await startEchoServer()]
  const chat = await startChatServer()
  const app = Fastify({ logger: true })

  await app.register(wstunnel, {
    health: true, // GET /health, for a load balancer
    metrics: true, // GET /metrics, Prometheus text
    routes: {
      '/echo': { upstream: echoes.map(echo => ({ host: '127.0.0.1', port: echo.address().port })), frame: 'text' },
      '/chat': { upstream: `127.0.0.1:${chat.address().port}`, frame: 'text', idleTimeout: 300000 }
    }
  })
  const page = readFileSync(join(__dirname, 'index.html'))
  app.get('/', (_request, reply) => reply.type('text/html; charset=utf-8').send(page))
  app.get('/upstreams', async () => app.wstunnel.upstreams())
  app.get('/stats', async () => app.wstunnel.stats())
  app.addHook('onClose', async () => {
    for (const echo of echoes) echo.close()
    chat.close()
  })

  closeWithGrace({ delay: 5000 }, async ({ err }) => {
    if (err) app.log.error({ err }, 'shutting down after an error')
    await app.close()
  })
  await app.listen({ port: Number(process.env.PORT ?? 8080), host: process.env.HOST ?? '127.0.0.1' })
}

main().catch(err => {
  console.error(err)
  process.exit(1)
})
