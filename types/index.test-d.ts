import Fastify from 'fastify'
import { expectAssignable, expectError, expectNotAssignable, expectType } from 'tsd'
import wstunnel, { fastifyWstunnel, type FastifyWstunnelOptions, type UpstreamOption } from '..'

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

expectError(app.register(wstunnel, { routes: { '/x': { upstream: 5900 } } }))
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
