import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { connect, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openClient, receiveBytes, startGateway, startTcp, waitFor } from './helpers'

// Debian's nginx in front of a gateway under a sub-path, run from example/nginx/nginx.conf with the test's
// ports: the prefix is stripped, the client's address reaches the upstream through X-Forwarded-For and the
// PROXY header, and the Origin the browser sent is still what the gateway checks.

const NGINX = '/usr/sbin/nginx'
const EXAMPLE = join(__dirname, '..', 'example', 'nginx', 'nginx.conf')

/** A port that was free a moment ago. */
async function freePort (): Promise<number> {
  const server = createServer().listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as { port: number }
  await new Promise(resolve => server.close(resolve))
  return port
}

/** Resolves once something accepts TCP connections on the port. */
async function accepting (port: number, isDead: () => boolean): Promise<void> {
  for (;;) {
    if (isDead()) throw new Error('exited')
    const socket = connect(port, '127.0.0.1')
    const ok = await new Promise<boolean>(resolve => {
      socket.once('connect', () => resolve(true))
      socket.once('error', () => resolve(false))
    })
    socket.destroy()
    if (ok) return
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

test('nginx (example/nginx/nginx.conf) under /tunnel/: echo, the client address from X-Forwarded-For, and origins', {
  timeout: 30000,
  skip: existsSync(NGINX) ? false : `${NGINX} is not installed (apt-get install nginx; .ci/run installs it)`
}, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-nginx-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))

  // An upstream that reads the PROXY v1 line, then echoes.
  const proxyLines: string[] = []
  const upstream = await startTcp(socket => {
    let buffered = Buffer.alloc(0)
    const onData = (chunk: Buffer): void => {
      buffered = Buffer.concat([buffered, chunk])
      const end = buffered.indexOf('\r\n')
      if (end === -1) return
      socket.removeListener('data', onData)
      proxyLines.push(buffered.subarray(0, end).toString())
      socket.write(buffered.subarray(end + 2))
      socket.pipe(socket)
    }
    socket.on('data', onData)
  })
  t.after(() => upstream.close())
  const gateway = await startGateway(
    { routes: { '/echo': { upstream: upstream.address, proxyProtocol: 'v1', origins: ['https://app.example'] } } },
    undefined,
    { fastify: { trustProxy: '127.0.0.1' } }
  )
  t.after(() => gateway.app.close())
  const gatewayPort = Number(new URL(gateway.url).port)

  // The example with the test's ports, inside a main config that keeps every file nginx writes in `dir`.
  const front = await freePort()
  let site = readFileSync(EXAMPLE, 'utf8')
  for (const [pattern, replacement] of [
    [/^(\s+listen) 80;$/m, `$1 127.0.0.1:${front};`],
    [/^(\s+proxy_pass http:\/\/127\.0\.0\.1:)8080\b/m, `$1${gatewayPort}`]
  ] as Array<[RegExp, string]>) {
    assert.match(site, pattern, 'example/nginx/nginx.conf has changed: update this test')
    site = site.replace(pattern, replacement)
  }
  writeFileSync(join(dir, 'wstunnel.conf'), site)
  writeFileSync(join(dir, 'nginx.conf'), `daemon off;
master_process on;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log info;
events { worker_connections 64; }
http {
  access_log ${dir}/access.log;
  client_body_temp_path ${dir}/client_body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  include ${dir}/wstunnel.conf;
}
`)
  // -e: the error log nginx opens before it has read the config, also in `dir`.
  const nginx = spawn(NGINX, ['-p', dir, '-c', join(dir, 'nginx.conf'), '-e', join(dir, 'error.log')], { stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  let output = ''
  nginx.stdout.on('data', (chunk: Buffer) => { output += String(chunk) })
  nginx.stderr.on('data', (chunk: Buffer) => { output += String(chunk) })
  t.after(async () => {
    if (nginx.exitCode !== null || nginx.signalCode !== null) return
    const exited = once(nginx, 'exit')
    try {
      process.kill(-nginx.pid!, 'SIGKILL') // the master and its worker
    } catch {}
    await exited
  })
  await accepting(front, () => nginx.exitCode !== null).catch(() => {
    const log = existsSync(join(dir, 'error.log')) ? readFileSync(join(dir, 'error.log'), 'utf8') : ''
    assert.fail(`nginx did not start (exit ${nginx.exitCode}):\n${output}\n${log}`)
  })

  const url = `ws://127.0.0.1:${front}/tunnel/echo`
  const headers = { 'X-Forwarded-For': '203.0.113.7' }

  // (a) /tunnel/echo reaches the gateway's /echo, and echoes.
  const ws = await openClient(url, undefined, { origin: 'https://app.example', headers })
  const reply = receiveBytes(ws, 5)
  ws.send('hello')
  assert.equal((await reply).toString(), 'hello')

  // (b) The client is the address it claimed to nginx (nginx appends its own, which Fastify trusts), in the
  // gateway's log and in the PROXY header; its port is 0, as an X-Forwarded-For chain carries none.
  assert.deepEqual(proxyLines, [`PROXY TCP4 203.0.113.7 127.0.0.1 0 ${gatewayPort}`])
  await waitFor(() => gateway.logs.find('wstunnel bridge open').length === 1)
  assert.match(String(gateway.logs.find('wstunnel bridge open')[0].client), /^203\.0\.113\.7:/)
  ws.close()

  // (c) The browser's Origin passes through nginx unchanged: another page's is refused with 403, and the
  // upstream is never connected for it.
  const refused = await openClient(url, undefined, { origin: 'https://evil.example', headers }).then(() => null, (err: { statusCode?: number }) => err)
  assert.equal(refused?.statusCode, 403)
  assert.equal(upstream.connections, 1)
})
