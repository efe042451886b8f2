import cluster from 'node:cluster'
import { readFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import Fastify from 'fastify'
import closeWithGrace from 'close-with-grace'
import wstunnel from './index'
import { resolveOptions, type FastifyWstunnelOptions } from './options'
import { runPrimary } from './workers'

const USAGE = `usage:
  fastify-wstunnel --config gateway.json [--workers N]
      the plugin's options as JSON, plus "listen": { "port": 8080, "host": "127.0.0.1", "trustProxy": "127.0.0.1" }
  fastify-wstunnel [--workers N] [host:]port upstream
      websockify style: bridges path / on [host:]port to upstream ('host:port', '[ipv6]:port' or 'unix:/path')
  --workers N
      N processes serve the port (auto: one per CPU core); default 1`

/** Where the gateway listens and what it serves, read from the command line. */
export interface GatewayConfig {
  /** Where to listen, and Fastify's trustProxy for the clients' addresses behind a proxy. */
  listen: { port: number, host: string, trustProxy?: TrustProxy }
  options: FastifyWstunnelOptions
  /** How many processes serve the port; 1 serves it from this one. */
  workers: number
}

/** Reads the command line into a gateway config; throws an Error whose message is fit to print. */
export function parseArguments (args: string[]): GatewayConfig {
  const at = args.indexOf('--workers')
  const workers = at === -1 ? 1 : parseWorkers(args[at + 1])
  const rest = at === -1 ? args : [...args.slice(0, at), ...args.slice(at + 2)]
  if (rest.length === 2 && rest[0] === '--config') return { ...readConfig(rest[1]), workers }
  if (rest.length === 2 && !rest[0].startsWith('-')) {
    const options = { routes: { '/': { upstream: rest[1] } } } as FastifyWstunnelOptions
    resolveOptions(options)
    return { listen: parseListen(rest[0]), options, workers }
  }
  throw new Error(USAGE)
}

function parseWorkers (value: string | undefined): number {
  if (value === 'auto') return availableParallelism()
  const count = Number(value)
  if (value === undefined || !/^\d+$/.test(value) || !Number.isSafeInteger(count) || count < 1) {
    throw new Error(`--workers${value === undefined ? '' : ` ${value}`}: must be a whole number of processes, 1 or more, or auto\n${USAGE}`)
  }
  return count
}

function readConfig (file: string): Omit<GatewayConfig, 'workers'> {
  let config: unknown
  try {
    config = JSON.parse(readFileSync(file, 'utf8'))
  } catch (err) {
    throw new Error(`cannot read ${file}: ${(err as Error).message}`)
  }
  if (config === null || typeof config !== 'object' || Array.isArray(config)) throw new Error(`${file}: must hold a JSON object`)
  const { listen = {}, ...options } = config as { listen?: unknown }
  const problems: string[] = []
  const { port = 8080, host = '127.0.0.1', trustProxy, ...unknown } = (typeof listen === 'object' && listen !== null ? listen : {}) as Record<string, unknown>
  if (typeof listen !== 'object' || listen === null) problems.push('listen: must be an object like { "port": 8080, "host": "127.0.0.1" }')
  if (!Number.isInteger(port) || (port as number) < 0 || (port as number) > 65535) problems.push('listen.port: must be an integer from 0 to 65535')
  if (typeof host !== 'string' || host === '') problems.push('listen.host: must be a host name or address')
  if (trustProxy !== undefined && !isTrustProxy(trustProxy)) problems.push('listen.trustProxy: must be true, false, an address or CIDR, or a list of them (Fastify\'s trustProxy)')
  for (const key of Object.keys(unknown)) problems.push(`listen.${key}: is not a known option`)
  try {
    resolveOptions(options)
  } catch (err) {
    problems.unshift(...(err as Error).message.split('\n').slice(1))
  }
  if (problems.length > 0) throw new Error(`${file}: invalid configuration:\n${problems.join('\n')}`)
  const trust = trustProxy === undefined ? {} : { trustProxy: trustProxy as TrustProxy }
  return { listen: { port: port as number, host: host as string, ...trust }, options: options as FastifyWstunnelOptions }
}

type TrustProxy = boolean | string | string[]

function isTrustProxy (value: unknown): value is TrustProxy {
  return typeof value === 'boolean' || (typeof value === 'string' && value !== '') ||
    (Array.isArray(value) && value.length > 0 && value.every(entry => typeof entry === 'string' && entry !== ''))
}

/** The longest a clean shutdown takes: every bridge's drain, then its client's closeTimeout. */
function shutdownBound (options: FastifyWstunnelOptions): number {
  const resolved = resolveOptions(options)
  return resolved.drainTimeout + Math.max(0, ...resolved.routes.map(route => route.closeTimeout))
}

function parseListen (value: string): { port: number, host: string } {
  const match = /^(?:(\[[^\]]+\]|[^:]+):)?(\d{1,5})$/.exec(value)
  const port = Number(match?.[2])
  if (match === null || port > 65535) throw new Error(`${value}: must be [host:]port\n${USAGE}`)
  return { port, host: match[1]?.replace(/^\[(.*)\]$/, '$1') ?? '127.0.0.1' }
}

/** Runs a gateway from the command line until SIGINT or SIGTERM: in this process, or in `--workers` processes. */
export async function main (args: string[]): Promise<void> {
  let config: GatewayConfig
  try {
    config = parseArguments(args)
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`)
    process.exitCode = 2
    return
  }
  const bound = shutdownBound(config.options)
  if (config.workers > 1 && cluster.isPrimary) {
    runPrimary(config.workers, bound + 10000)
    return
  }
  const { trustProxy, ...listen } = config.listen
  const app = Fastify({ logger: true, ...(trustProxy === undefined ? {} : { trustProxy }) })
  await app.register(wstunnel, config.options)
  // A worker may be signalled twice (by its primary, and by a Ctrl-C or systemd stop sent to the whole
  // process group), and close-with-grace exits at once on a second signal: a worker closes on the first and
  // ignores the others. Its primary bounds the wait.
  const signals: Array<'SIGINT' | 'SIGTERM'> = cluster.isWorker ? ['SIGINT', 'SIGTERM'] : []
  const grace = closeWithGrace({ delay: bound + 5000, skip: signals }, async ({ err }) => {
    if (err !== undefined) app.log.error({ err }, 'shutting down after an error')
    await app.close()
  })
  let closing = false
  for (const signal of signals) {
    process.on(signal, () => {
      if (!closing) grace.close()
      closing = true
    })
  }
  await app.listen(listen)
}
