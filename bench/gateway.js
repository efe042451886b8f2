'use strict'

// fastify-wstunnel under test, in a process of its own (started with --expose-gc).
// argv[2] is the upstream ports as JSON; the listening port goes to the parent over IPC.
// 'gc' makes it collect garbage and answer with its memory usage.
const { dirname, join } = require('node:path')
const Fastify = require('fastify')
// argv[3], if given, is another checkout to load the plugin from (BENCH_COMPARE).
const wstunnel = require(process.argv[3] ?? '..')

async function main () {
  const ports = JSON.parse(process.argv[2])
  // Logging off, as lighttpd runs without an access log here: the benchmark measures the bridge.
  const app = Fastify({ logger: false })
  await app.register(wstunnel, {
    routes: {
      '/echo': { upstream: `127.0.0.1:${ports.echo}` },
      '/source': { upstream: `127.0.0.1:${ports.source}` },
      '/sink': { upstream: `127.0.0.1:${ports.sink}` }
    }
  })
  // BENCH_INTERNALS_OFF=clientOnread,wsFrames,releaseRequest measures what each private internal is worth.
  if (process.env.BENCH_INTERNALS_OFF) {
    const { internals } = require(join(dirname(require.resolve(process.argv[3] ?? '..')), 'private-internals'))
    for (const name of process.env.BENCH_INTERNALS_OFF.split(',')) internals[name] = false
  }
  await app.listen({ port: 0, host: '127.0.0.1', backlog: 4096 })
  process.on('message', message => {
    if (message === 'gc') {
      global.gc()
      global.gc()
      process.send({ memory: process.memoryUsage() })
    }
  })
  const stop = () => app.close().then(() => process.exit(0)) // exit, not a signal: --cpu-prof writes then
  process.on('disconnect', stop)
  process.on('SIGTERM', stop)
  process.send({ port: app.server.address().port })
}

main()
