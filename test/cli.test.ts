import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArguments } from '../lib/cli'
import { openClient, receiveBytes, startEcho, waitFor } from './helpers'

const BIN = join(__dirname, '..', 'bin', 'fastify-wstunnel.js')

function run (args: string[]): ChildProcess {
  return spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
}

/** Resolves with the URL the gateway logged once it listens. */
async function listening (child: ChildProcess): Promise<string> {
  let output = ''
  for await (const chunk of child.stdout!) {
    output += String(chunk)
    const match = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output)
    if (match !== null) return match[1].replace('http', 'ws')
  }
  throw new Error(`gateway exited without listening: ${output}`)
}

async function finished (child: ChildProcess): Promise<{ code: number | null, stderr: string }> {
  let stderr = ''
  child.stderr!.on('data', (chunk: Buffer) => { stderr += String(chunk) })
  const [code] = await once(child, 'exit') as [number | null]
  return { code, stderr }
}

test('websockify style: `fastify-wstunnel port upstream` bridges / to the upstream', { timeout: 15000 }, async (t) => {
  const echo = await startEcho()
  const child = run(['127.0.0.1:0', echo.address])
  t.after(async () => { child.kill('SIGKILL'); await echo.close() })

  const url = await listening(child)
  const ws = await openClient(`${url}/`)
  const reply = receiveBytes(ws, 5)
  ws.send('hello')
  assert.equal((await reply).toString(), 'hello')
  ws.close()
  // SIGTERM shuts it down cleanly.
  const exit = finished(child)
  child.kill('SIGTERM')
  assert.equal((await exit).code, 0)
})

test('--config runs a gateway from a JSON file with listen', { timeout: 15000 }, async (t) => {
  const echo = await startEcho()
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-cli-'))
  const file = join(dir, 'gateway.json')
  writeFileSync(file, JSON.stringify({ listen: { port: 0, host: '127.0.0.1' }, routes: { '/echo': { upstream: echo.address, frame: 'text' } } }))
  const child = run(['--config', file])
  t.after(async () => { child.kill('SIGKILL'); await echo.close(); rmSync(dir, { recursive: true, force: true }) })

  const url = await listening(child)
  const ws = await openClient(`${url}/echo`)
  const reply = new Promise<boolean>(resolve => ws.once('message', (_data, isBinary: boolean) => resolve(isBinary)))
  ws.send('text please')
  assert.equal(await reply, false)
  ws.close()
})

test('bad config files and arguments print every problem and exit non-zero', { timeout: 15000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-cli-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const invalid = join(dir, 'invalid.json')
  writeFileSync(invalid, JSON.stringify({ listen: { port: 'http' }, routes: { '/x': { upstream: '127.0.0.1:0' }, '/y': { frame: 'hex' } } }))
  const broken = join(dir, 'broken.json')
  writeFileSync(broken, '{ "routes": ')

  const cases: Array<{ args: string[], expect: RegExp[] }> = [
    { args: ['--config', invalid], expect: [/routes\['\/x'\]\.upstream: must be/, /routes\['\/y'\]\.upstream: is required/, /routes\['\/y'\]\.frame: must be one of "binary", "text"/, /listen\.port: must be an integer/] },
    { args: ['--config', broken], expect: [/cannot read .*broken\.json/] },
    { args: ['--config', join(dir, 'missing.json')], expect: [/cannot read .*missing\.json.*ENOENT/] },
    { args: ['8080', 'not-an-upstream'], expect: [/routes\['\/'\]\.upstream: must be/] },
    { args: ['99999', '127.0.0.1:5900'], expect: [/99999: must be \[host:\]port/] },
    { args: ['--workers', '0', '8080', '127.0.0.1:5900'], expect: [/--workers 0: must be a whole number of processes, 1 or more, or auto/, /usage:/] },
    { args: ['8080', '--workers', 'x', '127.0.0.1:5900'], expect: [/--workers x: must be a whole number/] },
    { args: ['--config', invalid, '--workers', '-2'], expect: [/--workers -2: must be a whole number/] },
    { args: ['8080', '127.0.0.1:5900', '--workers'], expect: [/--workers: must be a whole number/] },
    { args: ['--workers', '2', '--workers', '2', '8080', '127.0.0.1:5900'], expect: [/usage:/] },
    { args: [], expect: [/usage:/] }
  ]
  for (const { args, expect } of cases) {
    const { code, stderr } = await finished(run(args))
    assert.equal(code, 2, `exit code for ${args.join(' ')}`)
    for (const pattern of expect) assert.match(stderr, pattern)
  }
})

test('--workers 1 (the default) serves from the one process, as without the flag', { timeout: 15000 }, async (t) => {
  const echo = await startEcho()
  const child = run(['127.0.0.1:0', '--workers', '1', echo.address])
  t.after(async () => { child.kill('SIGKILL'); await echo.close() })

  let output = ''
  child.stdout!.on('data', (chunk: Buffer) => { output += String(chunk) })
  await waitFor(() => output.includes('Server listening at'), 10000)
  const url = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output)![1].replace('http', 'ws')
  const ws = await openClient(`${url}/`)
  const reply = receiveBytes(ws, 2)
  ws.send('hi')
  assert.equal((await reply).toString(), 'hi')
  await waitFor(() => output.includes('wstunnel bridge open'))
  const exit = finished(child)
  child.kill('SIGTERM')
  assert.equal((await exit).code, 0)
  const lines = output.split('\n').filter(line => line.startsWith('{')).map(line => JSON.parse(line) as { pid: number, msg: string })
  assert.ok(lines.some(line => line.msg === 'wstunnel bridge open'))
  assert.deepEqual(new Set(lines.map(line => line.pid)), new Set([child.pid]))
})

test('--workers is read anywhere on the line: a number, or auto for one per core', () => {
  assert.equal(parseArguments(['8080', '127.0.0.1:5900']).workers, 1)
  assert.equal(parseArguments(['--workers', '3', '8080', '127.0.0.1:5900']).workers, 3)
  assert.equal(parseArguments(['8080', '--workers', 'auto', '127.0.0.1:5900']).workers, availableParallelism())
  assert.deepEqual(parseArguments(['8080', '127.0.0.1:5900', '--workers', '2']).listen, { port: 8080, host: '127.0.0.1' })
})

test('a config file may give Fastify\'s trustProxy under listen; a bad one is a problem named with the rest', () => {
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-cli-trust-'))
  try {
    const good = join(dir, 'good.json')
    writeFileSync(good, JSON.stringify({ listen: { port: 8080, trustProxy: '127.0.0.1' }, routes: { '/': { upstream: '127.0.0.1:5900' } } }))
    assert.deepEqual(parseArguments(['--config', good]).listen, { port: 8080, host: '127.0.0.1', trustProxy: '127.0.0.1' })
    const bad = join(dir, 'bad.json')
    writeFileSync(bad, JSON.stringify({ listen: { trustProxy: 3 }, routes: { '/': { upstream: '127.0.0.1:5900' } } }))
    assert.throws(() => parseArguments(['--config', bad]), /listen\.trustProxy: must be true, false, an address or CIDR, or a list of them/)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
