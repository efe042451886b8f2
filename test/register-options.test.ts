import { test } from 'node:test'
import assert from 'node:assert/strict'
import { openClient, startEcho, startGateway, waitFor } from './helpers'

test("Fastify's register options: prefix serves the routes and endpoints under it; logLevel applies, a route's own wins", { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({
    prefix: '/tunnel',
    logLevel: 'warn',
    health: true,
    routes: {
      '/quiet': { upstream: echo.address },
      '/loud': { upstream: echo.address, logLevel: 'info' }
    }
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  for (const path of ['/tunnel/quiet', '/tunnel/loud']) {
    const ws = await openClient(`${gateway.url}${path}`)
    ws.close()
  }
  await waitFor(() => gateway.app.wstunnel.connections === 0)
  await openClient(`${gateway.url}/quiet`).then(() => assert.fail('opened without the prefix'), (err: { statusCode: number }) => { assert.equal(err.statusCode, 404) })
  assert.equal((await fetch(`${gateway.url.replace('ws', 'http')}/tunnel/health`)).status, 200)
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  const opened = gateway.logs.find('wstunnel bridge open')
  assert.deepEqual(opened.map(line => line.route), ['/loud'], 'the warn-level route logs no bridge lines; the info-level one does')
  assert.deepEqual(Object.keys(gateway.app.wstunnel.stats().routes).sort(), ['/tunnel/loud', '/tunnel/quiet'])
})
