import type { RouteHandlerMethod } from 'fastify'
import type { BackendState } from './backend'
import type { UpstreamStatus } from './upstream-pool'

/** A route's health: 'ok' while one of its configured upstreams is believed up, or while it has none (its
 *  upstream is chosen per request, and nothing can be judged before one is). */
export interface RouteHealth { status: 'ok' | 'down', upstreams: UpstreamStatus[] }

/** The health endpoint: 200 while every route is ok and the server is not closing, else 503; the body names
 *  each route (by its full path) and its upstreams. What a load balancer's health check reads. */
export function healthHandler (state: BackendState): RouteHandlerMethod {
  return async function health (_request, reply) {
    const routes: Record<string, RouteHealth> = {}
    let ok = !state.closing
    for (const [path, pool] of state.pools) {
      const upstreams = pool.status()
      // An upstream a client named (a query target, resolveUpstream's choice) says nothing of the route's health.
      const configured = upstreams.filter(upstream => !upstream.dynamic)
      const status = configured.length === 0 || configured.some(upstream => upstream.state === 'up') ? 'ok' : 'down'
      if (status === 'down') ok = false
      routes[path] = { status, upstreams }
    }
    return await reply.code(ok ? 200 : 503).send({ status: state.closing ? 'closing' : ok ? 'ok' : 'down', routes })
  }
}
