import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Fastify from 'fastify'
import wstunnel from '../lib/index'
import { tokenId } from '../lib/token'
import { openClient, startGateway, startTcp, waitFor, type TcpServer } from './helpers'

function startNamed (name: string): Promise<TcpServer> {
  return startTcp(socket => {
    socket.write(`${name}\n`)
    socket.pipe(socket)
  })
}

async function greeting (url: string, protocols?: string | string[], headers?: Record<string, string>): Promise<string> {
  const ws = await openClient(url, protocols, { headers })
  await waitFor(() => ws.inbox.length > 0, 5000)
  ws.close()
  return ws.inbox[0].data.toString().trim()
}

async function refusal (url: string, protocols?: string | string[], headers?: Record<string, string>): Promise<{ statusCode: number, body: { code: string, message: string } }> {
  const error = await openClient(url, protocols, { headers }).then(() => null, (err: { statusCode: number, body: string }) => err)
  assert.ok(error !== null, 'the handshake was refused')
  return { statusCode: error.statusCode, body: JSON.parse(error.body) }
}

async function twoVms (t: { after: (fn: () => Promise<void>) => void }): Promise<[TcpServer, TcpServer]> {
  const vms = await Promise.all([startNamed('vm1'), startNamed('vm2')])
  t.after(async () => { await Promise.all(vms.map(vm => vm.close())) })
  return vms as [TcpServer, TcpServer]
}

test('a token from the query, a path segment, a cookie or a sub-protocol entry picks its upstream', { timeout: 20000 }, async (t) => {
  const [vm1, vm2] = await twoVms(t)
  const tokens = { 'secret-one': vm1.address, 'secret-two': vm2.address }
  const gateway = await startGateway({
    routes: {
      '/q': { target: { from: 'token', tokens } },
      '/p/:vm': { target: { from: 'token', tokens, source: 'path', name: 'vm' } },
      '/c': { target: { from: 'token', tokens, source: 'cookie', name: 'session' } },
      '/s': { target: { from: 'token', tokens, source: ['subprotocol', 'query'] }, subprotocols: ['binary', 'base64'] }
    }
  })
  t.after(() => gateway.app.close())

  assert.equal(await greeting(`${gateway.url}/q?token=secret-one`), 'vm1')
  assert.equal(await greeting(`${gateway.url}/q?a=1&token=secret-two`), 'vm2')
  assert.equal(await greeting(`${gateway.url}/p/secret-two`), 'vm2')
  assert.equal(await greeting(`${gateway.url}/c`, undefined, { cookie: 'theme=dark; session=secret-one' }), 'vm1')
  assert.equal(await greeting(`${gateway.url}/s?token=secret-one`), 'vm1', 'the second source is used when the first has none')
  // The bearer entry is never the answer: the route's own choice is made from the rest.
  const ws = await openClient(`${gateway.url}/s`, ['token.secret-two', 'base64'])
  assert.equal(ws.protocol, 'base64')
  await waitFor(() => ws.inbox.length > 0)
  assert.equal(ws.inbox[0].data.toString(), 'vm2\n')
  ws.close()
  // Offered alone, the token would leave nothing to answer, and the client would fail the handshake: 400 first.
  const bare = await refusal(`${gateway.url}/s`, ['token.secret-one'])
  assert.equal(bare.statusCode, 400)
  assert.match(bare.body.message, /offer a sub-protocol besides the token\.<token> entry/)
  // The token never reaches a log line whole.
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length >= 6)
  const logged = JSON.stringify(gateway.logs.lines)
  assert.ok(!logged.includes('secret-one') && !logged.includes('secret-two'), 'no token in the logs')
  assert.ok(logged.includes(tokenId('secret-one')), 'tokens are logged by their short hash')
  assert.ok(gateway.logs.find('incoming request').some(line => String((line.req as { url: string }).url).includes(`token=${encodeURIComponent(tokenId('secret-one'))}`)))
})

test('an unknown or missing token answers 404 before any connection attempt', { timeout: 20000 }, async (t) => {
  const [vm1] = await twoVms(t)
  const gateway = await startGateway({
    routes: {
      '/q': { target: { from: 'token', tokens: { good: vm1.address } } },
      '/s': { target: { from: 'token', tokens: { good: vm1.address }, source: 'subprotocol' }, subprotocols: ['binary'] }
    }
  })
  t.after(() => gateway.app.close())

  const unknown = await refusal(`${gateway.url}/q?token=nope`)
  assert.equal(unknown.statusCode, 404)
  assert.equal(unknown.body.code, 'FST_WSTUNNEL_UNKNOWN_TOKEN')
  assert.equal(unknown.body.message, `unknown token ${tokenId('nope')}`)
  const missing = await refusal(`${gateway.url}/q`)
  assert.equal(missing.statusCode, 404)
  assert.match(missing.body.message, /no token given \(query 'token'\)/)
  assert.equal((await refusal(`${gateway.url}/s`, ['binary', 'token.nope'])).statusCode, 404)
  assert.equal((await refusal(`${gateway.url}/s`, ['binary'])).statusCode, 404)
  assert.equal((await refusal(`${gateway.url}/s`, ['token.good'])).statusCode, 400, 'the token alone leaves nothing to answer')
  assert.equal(vm1.connections, 0, 'no connection was attempted')
  assert.ok(!JSON.stringify(gateway.logs.lines).includes('nope'))
})

test('a token file in websockify format is read at registration and again when it changes, without dropping bridges', { timeout: 20000 }, async (t) => {
  const [vm1, vm2] = await twoVms(t)
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-tokens-'))
  const file = join(dir, 'tokens.cfg')
  writeFileSync(file, `# websockify token file\nalpha: ${vm1.address}\n\nbeta:  ${vm2.address}\n`)
  const gateway = await startGateway({ routes: { '/vnc': { target: { from: 'token', tokensFile: file, tokens: { inline: vm2.address } } } } })
  t.after(async () => {
    await gateway.app.close()
    rmSync(dir, { recursive: true, force: true })
  })
  const url = `${gateway.url}/vnc?token=`

  assert.equal(await greeting(url + 'alpha'), 'vm1')
  assert.equal(await greeting(url + 'beta'), 'vm2')
  assert.equal(await greeting(url + 'inline'), 'vm2')
  const open = await openClient(url + 'alpha')

  // Replaced the way config tools do it: a new file renamed into place.
  writeFileSync(file + '.new', `alpha: ${vm2.address}\ngamma: ${vm1.address}\n`)
  renameSync(file + '.new', file)
  await waitFor(() => gateway.logs.find('wstunnel token file reloaded').length > 0, 5000)
  assert.equal(await greeting(url + 'alpha'), 'vm2')
  assert.equal(await greeting(url + 'gamma'), 'vm1')
  assert.equal((await refusal(url + 'beta')).statusCode, 404, 'a token taken out of the file is refused')
  assert.equal(await greeting(url + 'inline'), 'vm2', 'inline tokens stay')

  // A file that no longer parses leaves the table as it was.
  writeFileSync(file, 'alpha vm1\n')
  await waitFor(() => gateway.logs.find('wstunnel token file not reloaded').length > 0, 5000)
  assert.equal(await greeting(url + 'alpha'), 'vm2')

  open.send('still here')
  await waitFor(() => open.inbox.length >= 2)
  assert.equal(Buffer.concat(open.inbox.map(message => message.data)).toString(), 'vm1\nstill here', 'the open bridge kept going')
  open.close()
})

test('a query target reaches only what the allow-list allows, checked before any connection', { timeout: 20000 }, async (t) => {
  const [vm1, vm2] = await twoVms(t)
  const gateway = await startGateway({
    routes: {
      '/db': { target: { from: 'query', param: 'address', allow: [`127.0.0.1:${vm1.port}`, `localhost:${vm2.port}`] } }
    }
  })
  t.after(() => gateway.app.close())
  const url = `${gateway.url}/db?address=`

  assert.equal(await greeting(url + `127.0.0.1:${vm1.port}`), 'vm1')
  assert.equal(await greeting(url + `localhost:${vm2.port}`), 'vm2', 'a name allowed by name')
  // The port of vm2 is allowed only by the name localhost: the address is not, nor other names for it.
  const before = vm1.connections + vm2.connections
  for (const target of [`127.0.0.1:${vm2.port}`, `127.1:${vm2.port}`, `[::ffff:127.0.0.1]:${vm2.port}`, `10.0.0.1:${vm1.port}`]) {
    const refused = await refusal(url + encodeURIComponent(target))
    assert.equal(refused.statusCode, 403, target)
    assert.equal(refused.body.code, 'FST_WSTUNNEL_TARGET_FORBIDDEN')
  }
  for (const target of ['', 'nohost', 'a@b:1', `127.0.0.1:${vm1.port}/x`]) {
    assert.equal((await refusal(url + encodeURIComponent(target))).statusCode, 400, JSON.stringify(target))
  }
  assert.equal((await refusal(`${gateway.url}/db`)).body.code, 'FST_WSTUNNEL_BAD_TARGET')
  assert.equal(vm1.connections + vm2.connections, before, 'nothing refused was connected')
  // The name given is judged by what it resolves to against address entries.
  const byAddress = await startGateway({ routes: { '/db': { target: { from: 'query', allow: [`127.0.0.0/8:${vm1.port}`] } } } })
  t.after(() => byAddress.app.close())
  assert.equal(await greeting(`${byAddress.url}/db?address=localhost:${vm1.port}`), 'vm1')
})

test('resolveUpstream chooses the upstream after the app\'s own hooks', { timeout: 20000 }, async (t) => {
  const [vm1, vm2] = await twoVms(t)
  const gateway = await startGateway({
    routes: {
      '/vm/:id': {
        resolveUpstream (request) {
          const user = (request as unknown as { user?: string }).user
          const id = (request.params as { id: string }).id
          if (user !== 'alice') return null
          return id === '1' ? vm1.address : id === '2' ? [{ host: '127.0.0.1', port: vm2.port }] : id === 'bad' ? 'not an upstream' : null
        }
      }
    }
  }, (app) => {
    app.decorateRequest('user', undefined)
    app.addHook('preHandler', async (request) => {
      (request as unknown as { user?: string }).user = request.headers.authorization === 'Bearer alice' ? 'alice' : undefined
    })
  })
  t.after(() => gateway.app.close())

  const alice = { authorization: 'Bearer alice' }
  assert.equal(await greeting(`${gateway.url}/vm/1`, undefined, alice), 'vm1')
  assert.equal(await greeting(`${gateway.url}/vm/2`, undefined, alice), 'vm2')
  assert.equal((await refusal(`${gateway.url}/vm/1`)).statusCode, 404, 'no user: no upstream')
  assert.equal((await refusal(`${gateway.url}/vm/3`, undefined, alice)).body.code, 'FST_WSTUNNEL_NO_UPSTREAM')
  const bad = await refusal(`${gateway.url}/vm/bad`, undefined, alice)
  assert.equal(bad.statusCode, 500)
  assert.equal(bad.body.code, 'FST_WSTUNNEL_INVALID_UPSTREAM')
})

test('target options are checked at registration, every problem at once', async () => {
  const app = Fastify()
  await assert.rejects(async () => {
    await app.register(wstunnel, {
      routes: {
        '/open': { target: { from: 'query' } },
        '/both': { upstream: '127.0.0.1:1', target: { from: 'token', tokens: { a: '127.0.0.1:1' } } },
        '/none': { target: { from: 'token' } },
        '/path': { target: { from: 'token', tokens: { a: '127.0.0.1:1' }, source: 'path' } },
        '/file': { target: { from: 'token', tokensFile: '/nonexistent/tokens.cfg' } },
        '/bad': { target: { from: 'query', allow: ['10.0.0.0/33:5432'] } },
        '/fn': { resolveUpstream: 'no' as unknown as () => null },
        '/sp': { target: { from: 'token', tokens: { a: '127.0.0.1:1' }, source: 'subprotocol' } }
      }
    })
  }, (err: Error) => {
    assert.match(err.message, /routes\['\/open'\]\.target\.allow: is required/)
    assert.match(err.message, /routes\['\/both'\]: give one of upstream/)
    assert.match(err.message, /routes\['\/none'\]\.target: a token target needs tokens or tokensFile/)
    assert.match(err.message, /routes\['\/path'\]\.target\.source: 'path' needs the route path to hold the segment ':token'/)
    assert.match(err.message, /\/nonexistent\/tokens\.cfg: cannot read the token file: ENOENT/)
    assert.match(err.message, /routes\['\/bad'\]\.target\.allow\[0\]: "10\.0\.0\.0\/33:5432" is not an allow-list entry/)
    assert.match(err.message, /routes\['\/fn'\]\.resolveUpstream: must be a function/)
    assert.match(err.message, /routes\['\/sp'\]\.target\.source: 'subprotocol' needs the route to list its sub-protocols/)
    return true
  })
  await app.close()
})

test('option errors name the branch meant: an empty allow-list, an empty upstream list, a bad TLS field', async () => {
  const app = Fastify()
  await assert.rejects(async () => {
    await app.register(wstunnel, {
      routes: {
        '/a': { target: { from: 'query', allow: [] } },
        '/b': { upstream: [] },
        '/c': { upstream: [{ host: 'x', port: 0 }] },
        '/d': { upstream: { host: 'a', port: 1, tls: { ca: 5 as unknown as string } } },
        '/e': { target: { from: 'dns' } as never }
      }
    })
  }, (err: Error) => {
    assert.deepEqual(err.message.split('\n').slice(1), [
      "routes['/a'].target.allow: must be a non-empty list of allowed targets",
      "routes['/b'].upstream: must be a non-empty list of upstreams",
      "routes['/c'].upstream[0].port: must be an integer from 1 to 65535",
      "routes['/d'].upstream.tls.ca: must be a file path or PEM text, or a non-empty list of them",
      "routes['/e'].target: must be { from: 'token', tokens or tokensFile, source, name } or { from: 'query', param, allow }"
    ])
    return true
  })
  await app.close()
})

test('a token offered as a sub-protocol is never quoted whole in a 400 or a log line', { timeout: 10000 }, async (t) => {
  const gateway = await startGateway({ routes: { '/s': { target: { from: 'token', tokens: { SECRETAAA: '127.0.0.1:1' }, source: 'subprotocol' }, subprotocols: ['chat'] } } })
  t.after(() => gateway.app.close())
  const { request } = await import('node:http')
  const answer = await new Promise<{ status: number, body: string }>((resolve, reject) => {
    const req = request(`${gateway.url.replace('ws', 'http')}/s`, {
      headers: { connection: 'upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==', 'sec-websocket-protocol': 'chat, token.SECRETAAA, token.SECRETAAA' }
    })
    req.on('response', (response) => {
      let body = ''
      response.on('data', (chunk: Buffer) => { body += chunk.toString() })
      response.on('end', () => { resolve({ status: response.statusCode ?? 0, body }) })
    })
    req.on('error', reject)
    req.end()
  })
  assert.equal(answer.status, 400)
  assert.match(answer.body, new RegExp(`token\\.${tokenId('SECRETAAA')}`))
  await waitFor(() => gateway.logs.lines.length > 0)
  assert.ok(!answer.body.includes('SECRETAAA') && !JSON.stringify(gateway.logs.lines).includes('SECRETAAA'))
})

test('resolveUpstream still running when the app closes: the handshake is answered 503 and close() ends', { timeout: 10000 }, async (t) => {
  let called = false
  const gateway = await startGateway({ routes: { '/slow': { resolveUpstream: async () => { called = true; return await new Promise<never>(() => {}) } } } })
  t.after(() => gateway.app.close())
  const attempt = openClient(`${gateway.url}/slow`).then(() => null, (err: { statusCode: number, body: string }) => err)
  await waitFor(() => called)
  await gateway.app.close()
  const error = await attempt
  assert.equal(error?.statusCode, 503)
  assert.equal(JSON.parse(error.body).code, 'FST_WSTUNNEL_SHUTTING_DOWN')
})

test('upstreams chosen per request are listed while in use, balanced by their open bridges, and forgotten when idle', { timeout: 10000 }, async (t) => {
  const [vm1, vm2] = await twoVms(t)
  const gateway = await startGateway({ routes: { '/r': { resolveUpstream: () => [vm1.address, vm2.address], balance: 'least-connections' } } })
  t.after(() => gateway.app.close())
  const clients = []
  for (let index = 0; index < 4; index++) {
    const ws = await openClient(`${gateway.url}/r`)
    await waitFor(() => ws.inbox.length > 0)
    clients.push(ws)
  }
  assert.deepEqual(clients.map(ws => ws.inbox[0].data.toString().trim()).sort(), ['vm1', 'vm1', 'vm2', 'vm2'])
  const listed = gateway.app.wstunnel.upstreams()['/r']
  assert.deepEqual(Object.fromEntries(listed.map(entry => [entry.upstream, entry.connections])), { [vm1.address]: 2, [vm2.address]: 2 })
  for (const ws of clients) ws.close()
  await waitFor(() => gateway.app.wstunnel.upstreams()['/r'].length === 0)
})

test('option errors of sibling keys that start alike are all reported (tokens abc and abcd, upstream[1] and [10])', async () => {
  const app = Fastify()
  const upstreams = Array.from({ length: 11 }, () => '127.0.0.1:1')
  upstreams[1] = 'bad'
  ;(upstreams as unknown[])[10] = { host: 'h', port: 0 }
  await assert.rejects(async () => {
    await app.register(wstunnel, {
      routes: {
        '/t': { target: { from: 'token', tokens: { abc: { host: 'h', port: 0 }, abcd: 'nope' } } },
        '/u': { upstream: upstreams as never }
      }
    })
  }, (err: Error) => {
    assert.match(err.message, /routes\['\/t'\]\.target\.tokens\.abc\.port: must be an integer/)
    assert.match(err.message, /routes\['\/t'\]\.target\.tokens\.abcd: must be/)
    assert.match(err.message, /routes\['\/u'\]\.upstream\[1\]: must be/)
    assert.match(err.message, /routes\['\/u'\]\.upstream\[10\]\.port: must be an integer/)
    return true
  })
  await app.close()
})

test('an upstream chosen per request stays counted while another request is still connecting through the same list', { timeout: 20000 }, async (t) => {
  const [, vm2] = await twoVms(t)
  const silent = await startTcp(socket => { socket.resume() }) // a TLS upstream that never answers
  t.after(() => silent.close())
  const slowFirst = [{ host: '127.0.0.1', port: silent.port, tls: true }, vm2.address]
  const gateway = await startGateway({
    routes: { '/r': { resolveUpstream: (request) => (request.query as { slow?: string }).slow !== undefined ? slowFirst : vm2.address, balance: 'first', connectTimeout: 1000 } }
  })
  t.after(() => gateway.app.close())
  const first = openClient(`${gateway.url}/r?slow=1`) // waits on the silent one, then reaches vm2
  await waitFor(() => silent.connections === 1)
  const second = await openClient(`${gateway.url}/r`)
  second.close()
  await waitFor(() => vm2.sockets.size === 0)
  const third = await openClient(`${gateway.url}/r`)
  const ws = await first
  const listed = gateway.app.wstunnel.upstreams()['/r'].find(entry => entry.upstream === vm2.address)
  assert.equal(listed?.connections, 2, 'both bridges to vm2 are counted on the one listed entry')
  ws.close()
  third.close()
})

test('a token with a quote in it is not quoted in the 400 either', { timeout: 10000 }, async (t) => {
  const gateway = await startGateway({ routes: { '/s': { target: { from: 'token', tokens: { x: '127.0.0.1:1' }, source: 'subprotocol' }, subprotocols: ['chat'] } } })
  t.after(() => gateway.app.close())
  const { request } = await import('node:http')
  const body = await new Promise<string>((resolve, reject) => {
    const req = request(`${gateway.url.replace('ws', 'http')}/s`, {
      headers: { connection: 'upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==', 'sec-websocket-protocol': 'chat, token.abc"SECRETTAIL' }
    })
    req.on('response', (response) => {
      let text = ''
      response.on('data', (chunk: Buffer) => { text += chunk.toString() })
      response.on('end', () => { resolve(text) })
    })
    req.on('error', reject)
    req.end()
  })
  assert.match(body, /FST_WSTUNNEL_BAD_SUBPROTOCOL_HEADER/)
  await waitFor(() => gateway.logs.lines.length > 0)
  assert.ok(!body.includes('SECRETTAIL') && !JSON.stringify(gateway.logs.lines).includes('SECRETTAIL'))
})
