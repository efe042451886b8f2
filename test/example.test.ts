import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { join } from 'node:path'
import { listeningAt, openClient, texts, waitFor } from './helpers'

test('the example gateway serves its page and bridges the echo and chat backends', { timeout: 20000 }, async (t) => {
  const child = spawn(process.execPath, [join(__dirname, '..', 'example', 'gateway.js')], {
    env: { ...process.env, PORT: '0' },
    stdio: ['ignore', 'pipe', 'inherit']
  })
  t.after(() => { child.kill('SIGKILL') })
  const base = await listeningAt(child)

  const page = await fetch(base + '/')
  assert.equal(page.status, 200)
  const html = await page.text()
  assert.match(html, /new WebSocket/)
  assert.match(html, /\/echo/)
  assert.match(html, /\/chat/)

  const url = base.replace('http', 'ws')
  const echo = await openClient(url + '/echo')
  echo.send('héllo 𝄞\n')
  await waitFor(() => texts(echo).join('') === 'héllo 𝄞\n')

  const alice = await openClient(url + '/chat')
  await waitFor(() => texts(alice).join('').includes('welcome'))
  const bob = await openClient(url + '/chat')
  await waitFor(() => texts(bob).join('').includes('welcome'))
  bob.send('hi alice ✓\n')
  await waitFor(() => /guest2: hi alice ✓\n/.test(texts(alice).join('')))
  await waitFor(() => /guest2: hi alice ✓\n/.test(texts(bob).join('')))

  const upstreams = await (await fetch(base + '/upstreams')).json() as Record<string, Array<{ state: string, connections: number }>>
  assert.equal(upstreams['/echo'].length, 2)
  assert.deepEqual(upstreams['/echo'].map(entry => entry.state), ['up', 'up'])
  assert.equal(upstreams['/chat'][0].connections, 2)
  assert.match(html, /\/upstreams/)
  assert.match(html, /\/stats/)
  const stats = await (await fetch(base + '/stats')).json() as { total: { open: number }, routes: Record<string, { opened: number }> }
  assert.equal(stats.total.open, 3)
  assert.equal(stats.routes['/chat'].opened, 2)
  assert.equal((await fetch(base + '/health')).status, 200)
  assert.match(await (await fetch(base + '/metrics')).text(), /wstunnel_bridges_open\{route="\/echo"\} 1/)

  for (const ws of [echo, alice, bob]) ws.close()
  child.kill('SIGTERM')
  const [code] = await once(child, 'exit') as [number | null]
  assert.equal(code, 0)
})
