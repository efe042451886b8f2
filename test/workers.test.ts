import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { closed, killGroup, openClient, receiveBytes, runGroup, startEcho, waitFor, type Client, type Running } from './helpers'

// `--workers N`: real processes. The primary and its workers write JSON log lines to one stdout; each line
// carries the pid of the process that wrote it, so the test tells the workers apart by their lines.

const BIN = join(__dirname, '..', 'bin', 'fastify-wstunnel.js')

type Primary = Running

/** Starts the command in its own process group, collecting its log lines. */
function start (args: string[]): Primary {
  return runGroup(process.execPath, [BIN, ...args])
}

/** The pids that have logged that they listen, in order, and the URL they listen at. */
function listeners (primary: Primary): Array<{ pid: number, url: string }> {
  return primary.lines.flatMap(line => {
    const match = /^Server listening at (http:\/\/[^ ]+)$/.exec(String(line.msg))
    return match === null ? [] : [{ pid: line.pid as number, url: match[1].replace('http', 'ws') }]
  })
}

/** The exit codes of the workers the primary stopped. */
function stopped (primary: Primary): unknown[] {
  return primary.lines.filter(line => line.msg === 'wstunnel worker stopped').map(line => line.code)
}

/** The pid of the worker whose `wstunnel bridge open` line names this client's port. */
async function servedBy (primary: Primary, ws: Client): Promise<number> {
  // Other test runs on this host may connect to our port by chance: match our own client by its port.
  const client = `127.0.0.1:${(ws as unknown as { _socket: Socket })._socket.localPort}`
  const find = (): Record<string, unknown> | undefined => primary.lines.find(line => line.msg === 'wstunnel bridge open' && line.client === client)
  await waitFor(() => find() !== undefined, 10000)
  return find()!.pid as number
}

/** Sends a line and checks it comes back. */
async function echoes (ws: Client, text: string): Promise<void> {
  const before = ws.inbox.reduce((sum, message) => sum + message.data.length, 0)
  ws.send(text)
  const received = await receiveBytes(ws, before + text.length)
  assert.equal(received.subarray(before).toString(), text)
}

test('--workers 2: two processes serve one port, a dead worker is replaced, SIGTERM closes every client with 1001 and exits 0', { timeout: 90000 }, async (t) => {
  const echo = await startEcho()
  const primary = start(['--workers', '2', '127.0.0.1:0', echo.address])
  t.after(async () => { await killGroup(primary); await echo.close() })

  await waitFor(() => listeners(primary).length >= 2, 30000).catch(() => assert.fail(`two workers did not listen:\n${primary.output()}`))
  const [first, second] = listeners(primary)
  assert.notEqual(first.pid, second.pid)
  assert.ok(![first.pid, second.pid].includes(primary.child.pid!), 'the primary does not serve')
  assert.equal(first.url, second.url, 'both workers listen on the same port')
  const url = `${first.url}/`

  const clients: Client[] = []
  const pids = new Map<Client, number>()
  for (let i = 0; i < 6; i++) {
    const ws = await openClient(url)
    await echoes(ws, `hello ${i}`)
    clients.push(ws)
    pids.set(ws, await servedBy(primary, ws))
  }
  assert.deepEqual(new Set(pids.values()), new Set([first.pid, second.pid]), 'connections are spread over both workers')

  // A worker killed outright: its clients are cut off, the primary starts another in its place.
  const victim = pids.get(clients[0])!
  const survivor = victim === first.pid ? second.pid : first.pid
  const victims = clients.filter(ws => pids.get(ws) === victim)
  const cutOff = Promise.all(victims.map(ws => closed(ws)))
  process.kill(victim, 'SIGKILL')
  for (const { code } of await cutOff) assert.equal(code, 1006)
  await waitFor(() => listeners(primary).length >= 3, 30000).catch(() => assert.fail(`no replacement worker:\n${primary.output()}`))
  const replacement = listeners(primary)[2]
  assert.ok(![first.pid, second.pid].includes(replacement.pid))
  assert.equal(`${replacement.url}/`, url, 'the replacement listens on the same port')
  const died = primary.lines.find(line => line.msg === 'wstunnel worker died, starting another')
  assert.equal(died?.worker, victim)
  assert.equal(died?.signal, 'SIGKILL')

  const live = clients.filter(ws => pids.get(ws) !== victim)
  const newcomers: Client[] = []
  for (let i = 0; i < 4; i++) {
    const ws = await openClient(url)
    await echoes(ws, `again ${i}`)
    newcomers.push(ws)
    pids.set(ws, await servedBy(primary, ws))
  }
  assert.deepEqual(new Set(newcomers.map(ws => pids.get(ws))), new Set([survivor, replacement.pid]), 'new clients reach the survivor and the replacement')
  live.push(...newcomers)
  for (const ws of live) await echoes(ws, 'still here')

  // SIGTERM to the primary: every worker closes its bridges with 1001, and the primary exits 0 in bounded time.
  const goingAway = Promise.all(live.map(ws => closed(ws)))
  const stopAt = Date.now()
  primary.child.kill('SIGTERM')
  for (const { code } of await goingAway) assert.equal(code, 1001)
  const { code } = await primary.exited
  assert.equal(code, 0, primary.output())
  assert.ok(Date.now() - stopAt < 12000, `stopped in ${Date.now() - stopAt} ms`)
  assert.equal(listeners(primary).length, 3, 'no worker is started during shutdown')
  assert.deepEqual(stopped(primary), [0, 0], 'both workers closed cleanly')
  assert.equal(primary.lines.filter(line => line.msg === 'wstunnel worker died, starting another').length, 1)
})

test('--config with --workers: Ctrl-C (SIGINT to the whole group, then SIGTERM from the primary) still closes with 1001 and exits 0', { timeout: 60000 }, async (t) => {
  const echo = await startEcho()
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-workers-'))
  const file = join(dir, 'gateway.json')
  writeFileSync(file, JSON.stringify({ listen: { port: 0, host: '127.0.0.1' }, routes: { '/echo': { upstream: echo.address } } }))
  const primary = start(['--config', file, '--workers', '2'])
  t.after(async () => { await killGroup(primary); await echo.close(); rmSync(dir, { recursive: true, force: true }) })

  await waitFor(() => listeners(primary).length >= 2, 30000).catch(() => assert.fail(`two workers did not listen:\n${primary.output()}`))
  const ws = await openClient(`${listeners(primary)[0].url}/echo`)
  await echoes(ws, 'hello')

  // A terminal's Ctrl-C reaches the primary and every worker; the workers then also get the primary's SIGTERM.
  const goingAway = closed(ws)
  process.kill(-primary.child.pid!, 'SIGINT')
  assert.equal((await goingAway).code, 1001)
  assert.equal((await primary.exited).code, 0, primary.output())
  assert.equal(listeners(primary).length, 2)
  // Signalled twice, each worker still finished its graceful close.
  assert.deepEqual(stopped(primary), [0, 0])
})

test('workers that die as fast as they start (port taken) make the primary give up with a non-zero exit', { timeout: 60000 }, async (t) => {
  const taken = createServer()
  taken.listen(0, '127.0.0.1')
  await once(taken, 'listening')
  const { port } = taken.address() as { port: number }
  const primary = start(['--workers', '2', `127.0.0.1:${port}`, '127.0.0.1:1'])
  t.after(async () => { await killGroup(primary); await new Promise(resolve => taken.close(resolve)) })

  const { code } = await primary.exited
  assert.equal(code, 1, primary.output())
  assert.ok(primary.lines.some(line => /^wstunnel workers died 5 times in 10 s, giving up$/.test(String(line.msg))), primary.output())
  assert.match(primary.output(), /EADDRINUSE/)
})

test('starting workers makes no connection of its own to the shared port or the upstream', { timeout: 60000 }, async (t) => {
  const echo = await startEcho()
  const primary = start(['--workers', '3', '127.0.0.1:0', echo.address])
  t.after(async () => { await killGroup(primary); await echo.close() })

  await waitFor(() => listeners(primary).length >= 3, 30000).catch(() => assert.fail(`three workers did not listen:\n${primary.output()}`))
  await new Promise(resolve => setTimeout(resolve, 500))
  assert.deepEqual(primary.lines.filter(line => line.msg === 'incoming request').map(line => line.req), [])
  assert.equal(echo.connections, 0)
})
