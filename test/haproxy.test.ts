import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { get } from 'node:http'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { killGroup, openClient, receiveBytes, runGroup, startEcho, waitFor, type Client, type Running } from './helpers'

// Debian's HAProxy in front of two gateway processes, run from example/haproxy/haproxy.cfg with the test's
// ports: health checks on /health, connections spread over both, and a gateway killed outright.

const HAPROXY = '/usr/sbin/haproxy'
const BIN = join(__dirname, '..', 'bin', 'fastify-wstunnel.js')
const EXAMPLE = join(__dirname, '..', 'example', 'haproxy', 'haproxy.cfg')

/** Ports that were free a moment ago, distinct. */
async function freePorts (count: number): Promise<number[]> {
  const servers = Array.from({ length: count }, () => createServer().listen(0, '127.0.0.1'))
  await Promise.all(servers.map(server => once(server, 'listening')))
  const ports = servers.map(server => (server.address() as { port: number }).port)
  await Promise.all(servers.map(server => new Promise(resolve => server.close(resolve))))
  return ports
}

/** HAProxy's view of each server of the backend, from its CSV stats page. */
function serverStates (statsPort: number): Promise<Record<string, { status: string, check: string }>> {
  return new Promise((resolve, reject) => {
    get(`http://127.0.0.1:${statsPort}/stats;csv`, response => {
      let body = ''
      response.on('data', (chunk: Buffer) => { body += String(chunk) })
      response.on('end', () => {
        const [header, ...rows] = body.trim().split('\n').map(line => line.split(','))
        const column = (name: string): number => header.indexOf(name === 'pxname' ? '# pxname' : name)
        const states: Record<string, { status: string, check: string }> = {}
        for (const row of rows) {
          if (row[column('pxname')] === 'gateways') states[row[column('svname')]] = { status: row[column('status')], check: row[column('check_status')] }
        }
        resolve(states)
      })
    }).on('error', reject)
  })
}

/** Waits until HAProxy's last check of each server has the expected result (L7OK: passed, L4CON: refused). */
async function waitForChecks (haproxy: Running, statsPort: number, expected: Record<string, string>, timeout: number): Promise<void> {
  const deadline = Date.now() + timeout
  let states = {}
  for (;;) {
    if (haproxy.child.exitCode !== null) throw new Error(`haproxy exited with ${haproxy.child.exitCode}:\n${haproxy.output()}`)
    states = await serverStates(statsPort).catch(() => ({}))
    const seen = states as Record<string, { status: string, check: string }>
    if (Object.entries(expected).every(([server, check]) => seen[server]?.check === check)) return
    if (Date.now() > deadline) throw new Error(`HAProxy's servers are ${JSON.stringify(states)}, not ${JSON.stringify(expected)}`)
    await new Promise(resolve => setTimeout(resolve, 100))
  }
}

/** How many bridges a gateway process has logged as opened. */
function opens (gateway: Running): number {
  return gateway.lines.filter(line => line.msg === 'wstunnel bridge open').length
}

async function echoes (ws: Client, text: string): Promise<void> {
  const before = ws.inbox.reduce((sum, message) => sum + message.data.length, 0)
  ws.send(text)
  const received = await receiveBytes(ws, before + text.length)
  assert.equal(received.subarray(before).toString(), text)
}

test('HAProxy (example/haproxy/haproxy.cfg) spreads clients over two gateways and moves them to the survivor when one dies', {
  timeout: 90000,
  skip: existsSync(HAPROXY) ? false : `${HAPROXY} is not installed (apt-get install haproxy; .ci/run installs it)`
}, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-haproxy-'))
  const echo = await startEcho()
  const running: Running[] = []
  const clients: Client[] = []
  t.after(async () => {
    for (const ws of clients) ws.terminate()
    await Promise.all(running.map(killGroup))
    await echo.close()
    rmSync(dir, { recursive: true, force: true })
  })

  const file = join(dir, 'gateway.json')
  writeFileSync(file, JSON.stringify({ listen: { port: 0, host: '127.0.0.1' }, health: true, routes: { '/echo': { upstream: echo.address } } }))
  const gateways = [runGroup(process.execPath, [BIN, '--config', file]), runGroup(process.execPath, [BIN, '--config', file])]
  running.push(...gateways)
  const ports: number[] = []
  for (const gateway of gateways) {
    const port = (): string | undefined => gateway.lines.map(line => /^Server listening at http:\/\/127\.0\.0\.1:(\d+)$/.exec(String(line.msg))?.[1]).find(Boolean)
    await waitFor(() => port() !== undefined, 20000).catch(() => assert.fail(`a gateway did not listen:\n${gateway.output()}`))
    ports.push(Number(port()))
  }

  // The example, with the test's ports, quick checks, and a stats page to read the checks' results from.
  const [front, stats] = await freePorts(2)
  const replacements: Array<[RegExp, string]> = [
    [/^(\s+bind )127\.0\.0\.1:8080$/m, `$1127.0.0.1:${front}`],
    [/^(\s+server gw1 )127\.0\.0\.1:8081$/m, `$1127.0.0.1:${ports[0]}`],
    [/^(\s+server gw2 )127\.0\.0\.1:8082$/m, `$1127.0.0.1:${ports[1]}`],
    [/^(\s+default-server check) inter 2s fall 2 rise 2$/m, '$1 inter 300ms fall 2 rise 1']
  ]
  let config = readFileSync(EXAMPLE, 'utf8')
  for (const [pattern, replacement] of replacements) {
    assert.match(config, pattern, 'example/haproxy/haproxy.cfg has changed: update this test')
    config = config.replace(pattern, replacement)
  }
  config += `\nlisten stats\n    bind 127.0.0.1:${stats}\n    stats enable\n    stats uri /stats\n`
  writeFileSync(join(dir, 'haproxy.cfg'), config)
  const haproxy = runGroup(HAPROXY, ['-f', join(dir, 'haproxy.cfg'), '-db'])
  running.push(haproxy)

  // Both gateways pass the health check: GET /health answers 200.
  await waitForChecks(haproxy, stats, { gw1: 'L7OK', gw2: 'L7OK' }, 15000)

  const url = `ws://127.0.0.1:${front}/echo`
  for (let i = 0; i < 6; i++) {
    const ws = await openClient(url)
    clients.push(ws)
    await echoes(ws, `hello ${i}`)
  }
  await waitFor(() => opens(gateways[0]) + opens(gateways[1]) === 6, 5000)
  const [onFirst, onSecond] = gateways.map(opens)
  assert.ok(onFirst > 0 && onSecond > 0, `clients spread over both gateways: ${onFirst} and ${onSecond}`)
  t.diagnostic(`clients per gateway: ${onFirst} and ${onSecond}`)

  // The first gateway dies: its clients are closed, HAProxy marks it down, and they reconnect to the survivor.
  const codes: number[] = []
  for (const ws of clients) ws.once('close', (code: number) => codes.push(code))
  await killGroup(gateways[0])
  await waitFor(() => codes.length === onFirst, 10000).catch(() => assert.fail(`${codes.length} clients closed, ${onFirst} expected`))
  assert.deepEqual(codes, new Array(onFirst).fill(1006))
  await waitForChecks(haproxy, stats, { gw1: 'L4CON', gw2: 'L7OK' }, 10000)

  for (const [i, ws] of clients.entries()) {
    if (ws.readyState === WebSocket.OPEN) continue
    clients[i] = await openClient(url)
  }
  for (const [i, ws] of clients.entries()) await echoes(ws, `still ${i}`)
  assert.equal(opens(gateways[1]), onSecond + onFirst, 'every reconnected client is served by the survivor')

  // No upstream connection outlives its client: the echo server holds exactly one per live client.
  await waitFor(() => echo.sockets.size === clients.length, 5000).catch(() => assert.fail(`${echo.sockets.size} upstream sockets for ${clients.length} clients`))
  await new Promise(resolve => setTimeout(resolve, 300))
  assert.equal(echo.sockets.size, clients.length)
})
