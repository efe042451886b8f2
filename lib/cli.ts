import { readFileSync } from 'node:fs'
import Fastify from 'fastify'
import closeWithGrace from 'close-with-grace'
import wstunnel from './index'
import { resolveOptions, type FastifyWstunnelOptions } from './options'

const USAGE = `usage:
  fastify-wstunnel --config gateway.json
      the plugin's options as JSON, plus "listen": { "port": 8080, "host": "127.0.0.1" }
  fastify-wstunnel [host:]port upstream
      websockify style: bridges path / on [host:]port to upstream ('host:port', '[ipv6]:port' or 'unix:/path')`

/** Where the gateway listens and what it serves, read from the command line. */
export interface GatewayConfig {
  listen: { port: number, host: string }
  options: FastifyWstunnelOptions
}

/** Reads the command line into a gateway config; throws an Error whose message is fit to print. */
export function parseArguments (args: string[]): GatewayConfig {
  if (args.length === 2 && args[0] === '--config') return readConfig(args[1])
  if (args.length === 2 && !args[0].startsWith('-')) {
    const options = { routes: { '/': { upstream: args[1] } } } as FastifyWstunnelOptions
    resolveOptions(options)
    return { listen: parseListen(args[0]), options }
  }
  throw new Error(USAGE)
}

function readConfig (file: string): GatewayConfig {
  let config: unknown
  try {
    config = JSON.parse(readFileSync(file, 'utf8'))
  } catch (err) {
    throw new Error(`cannot read ${file}: ${(err as Error).message}`)
  }
  if (config === null || typeof config !== 'object' || Array.isArray(config)) throw new Error(`${file}: must hold a JSON object`)
  const { listen = {}, ...options } = config as { listen?: unknown }
  const problems: string[] = []
  const { port = 8080, host = '127.0.0.1', ...unknown } = (typeof listen === 'object' && listen !== null ? listen : {}) as Record<string, unknown>
  if (typeof listen !== 'object' || listen === null) problems.push('listen: must be an object like { "port": 8080, "host": "127.0.0.1" }')
  if (!Number.isInteger(port) || (port as number) < 0 || (port as number) > 65535) problems.push('listen.port: must be an integer from 0 to 65535')
  if (typeof host !== 'string' || host === '') problems.push('listen.host: must be a host name or address')
  for (const key of Object.keys(unknown)) problems.push(`listen.${key}: is not a known option`)
  try {
    resolveOptions(options)
  } catch (err) {
    problems.unshift(...(err as Error).message.split('\n').slice(1))
  }
  if (problems.length > 0) throw new Error(`${file}: invalid configuration:\n${problems.join('\n')}`)
  return { listen: { port: port as number, host: host as string }, options: options as FastifyWstunnelOptions }
}

function parseListen (value: string): { port: number, host: string } {
  const match = /^(?:(\[[^\]]+\]|[^:]+):)?(\d{1,5})$/.exec(value)
  const port = Number(match?.[2])
  if (match === null || port > 65535) throw new Error(`${value}: must be [host:]port\n${USAGE}`)
  return { port, host: match[1]?.replace(/^\[(.*)\]$/, '$1') ?? '127.0.0.1' }
}

/** Runs a gateway from the command line until SIGINT or SIGTERM. */
export async function main (args: string[]): Promise<void> {
  let config: GatewayConfig
  try {
    config = parseArguments(args)
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`)
    process.exitCode = 2
    return
  }
  const app = Fastify({ logger: true })
  await app.register(wstunnel, config.options)
  closeWithGrace({ delay: 5000 }, async ({ err }) => {
    if (err !== undefined) app.log.error({ err }, 'shutting down after an error')
    await app.close()
  })
  await app.listen(config.listen)
}
