import Fastify from 'fastify'
import { expectAssignable, expectError, expectNotAssignable, expectType } from 'tsd'
import { Registry } from 'prom-client'
import wstunnel, { fastifyWstunnel, type FastifyWstunnelOptions, type RouteStatsSnapshot, type UpstreamOption, type UpstreamStatus } from '..'

const app = Fastify()

app.register(wstunnel, {
  routes: {
    '/echo': { upstream: '127.0.0.1:9000' },
    '/vnc': { upstream: { host: '127.0.0.1', port: 5900 }, frame: 'binary' },
    '/chat': { upstream: 'unix:/run/chat.sock', frame: 'text', idleTimeout: 300000, invalidUtf8: 'replace' },
    '/sock': { upstream: { path: '/run/x.sock' } }
  },
  pingInterval: 0,
  maxPayload: 65536
})
app.register(fastifyWstunnel, { routes: { '/': { upstream: '[::1]:5900' } } })
app.register(wstunnel, {
  routes: { '/a': { upstream: '127.0.0.1:1', maxPayload: 0, hostnames: ['gw.example'], origins: ['same-origin', 'chrome-extension://abcdef'] } },
  hostnames: ['localhost.example'],
  // An option set to undefined is an option left out.
  closeTimeout: undefined,
  maxPayload: undefined
})

app.register(wstunnel, {
  prefix: '/tunnel',
  balance: 'least-connections',
  maxFailures: 2,
  failBackoff: 500,
  failBackoffMax: 10000,
  healthCheck: { interval: 5000 },
  tls: { ca: '/etc/ssl/ca.pem' },
  routes: {
    '/pool': { upstream: ['10.0.0.1:9000', { host: '10.0.0.2', port: 9000, tls: { servername: 'db', rejectUnauthorized: true } }], balance: 'client-ip' },
    '/vnc': { target: { from: 'token', tokens: { vm1: '10.0.0.5:5900', vm2: ['10.0.0.6:5900', '10.0.0.7:5900'] }, tokensFile: '/etc/tokens.cfg', source: ['subprotocol', 'cookie'] }, subprotocols: ['binary'] },
    '/db': { target: { from: 'query', param: 'address', allow: ['127.0.0.1:5432', '10.0.0.0/8:5432'] } },
    '/vm/:id': { resolveUpstream: async (request) => (request.params as { id: string }).id === '1' ? '10.0.0.5:5900' : null },
    '/sync': { resolveUpstream: () => [{ path: '/run/a.sock' }] }
  }
})

app.register(wstunnel, {
  health: true,
  metrics: '/internal/metrics',
  metricsRegistry: new Registry(),
  closeCode: 1012,
  drainTimeout: 5000,
  handshakeTimeout: 5000,
  maxConnections: 1000,
  maxConnectionsPerIp: 20,
  maxPendingHandshakes: 100,
  handshakeRate: { max: 10, timeWindow: 1000 },
  logLevel: 'warn',
  routes: { '/vnc': { upstream: '127.0.0.1:5900', maxConnections: 10, logLevel: 'debug' } }
})

expectError(app.register(wstunnel, { closeCode: 1000, routes: {} }))
expectError(app.register(wstunnel, { health: 5, routes: {} }))
expectError(app.register(wstunnel, { routes: { '/x': { upstream: 5900 } } }))
expectError(app.register(wstunnel, { routes: { '/x': { upstream: '127.0.0.1:1', balance: 'fastest' } } }))
expectError(app.register(wstunnel, { routes: { '/x': { target: { from: 'token', source: 'header' } } } }))
expectError(app.register(wstunnel, { routes: { '/x': { target: { from: 'dns' } } } }))
expectError(app.register(wstunnel, { routes: { '/x': { resolveUpstream: () => 5900 } } }))
expectError(app.register(wstunnel, { routes: { '/x': { upstream: '127.0.0.1:1', frame: 'hex' } } }))
expectError(app.register(wstunnel, { routes: { '/x': { upstream: '127.0.0.1:1', colour: 'red' } } }))
expectError(app.register(wstunnel, {}))
expectError(app.register(wstunnel, { routes: { '/x': { upstream: '127.0.0.1:1', hostnames: 'gw.example' } } }))
expectError(app.register(wstunnel, { routes: { '/x': { upstream: '127.0.0.1:1', maxPayload: '1024' } } }))

expectAssignable<UpstreamOption>({ host: 'db', port: 5432 })
expectNotAssignable<UpstreamOption>({ host: 'db' })
expectAssignable<FastifyWstunnelOptions>({ routes: {}, idleTimeout: 1000 })

expectType<number>(app.wstunnel.connections)
expectType<number>(app.wstunnel.bufferedBytes())
expectType<Record<string, UpstreamStatus[]>>(app.wstunnel.upstreams())
expectType<'up' | 'down'>(app.wstunnel.upstreams()['/x'][0].state)
expectType<RouteStatsSnapshot>(app.wstunnel.stats().total)
expectType<number>(app.wstunnel.stats().routes['/x'].refused.origin)
