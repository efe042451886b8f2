import type { FastifyPluginAsync } from 'fastify'
import type {
  FastifyWstunnelOptions as Options,
  RouteOptions as Route,
  UpstreamOption as Upstream
} from '../dist/options'
import type { WstunnelDecorator as Decorator } from '../dist/index'
import type { UpstreamStatus as Status } from '../dist/upstream-pool'
import type { ResolveUpstream as Resolve } from '../dist/target'
import type { RouteStatsSnapshot as Snapshot, RefusalReason as Reason } from '../dist/stats'

declare module 'fastify' {
  interface FastifyInstance {
    wstunnel: Decorator
  }
}

type FastifyWstunnel = FastifyPluginAsync<fastifyWstunnel.FastifyWstunnelOptions>

declare namespace fastifyWstunnel {
  /** The plugin's options: `routes` maps each path to its upstream and settings. */
  export type FastifyWstunnelOptions = Options
  /** One route's options. */
  export type RouteOptions = Route
  /** 'host:port', '[ipv6]:port', 'unix:/path', { host, port } or { path }. */
  export type UpstreamOption = Upstream
  /** `fastify.wstunnel`: open connections, buffered bytes, and each route's upstreams. */
  export type WstunnelDecorator = Decorator
  /** One upstream's state in `fastify.wstunnel.upstreams()`. */
  export type UpstreamStatus = Status
  /** A route's `resolveUpstream`: (request) => upstream | upstream[] | null, or a promise of one. */
  export type ResolveUpstream = Resolve
  /** One route's counters (or their total) in `fastify.wstunnel.stats()`. */
  export type RouteStatsSnapshot = Snapshot
  /** Why a handshake was refused, as stats and metrics count it. */
  export type RefusalReason = Reason
  export const fastifyWstunnel: FastifyWstunnel
  export { fastifyWstunnel as default }
}

declare function fastifyWstunnel (...params: Parameters<FastifyWstunnel>): ReturnType<FastifyWstunnel>
export = fastifyWstunnel
