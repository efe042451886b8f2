import { Counter, Gauge, Histogram, type Registry } from 'prom-client'
import type { RouteStats, RouteStatsSnapshot } from './stats'

/** The plugin's metrics in a prom-client registry: read from `stats()` at each scrape (nothing is counted twice),
 *  with a route label and never one per connection; only the connect-time histogram is fed as connects happen,
 *  through `observe`. `remove` takes them out of the registry again. */
export function registerMetrics (registry: Registry, stats: () => Record<string, RouteStatsSnapshot>, routes: () => Map<string, RouteStats>):
{ observe: (route: string, seconds: number) => void, remove: () => void } {
  const registers = [registry]
  const perRoute = (name: string, help: string, value: (route: RouteStatsSnapshot) => number): Gauge => new Gauge({
    name,
    help,
    labelNames: ['route'],
    registers,
    collect () {
      this.reset()
      for (const [route, snapshot] of Object.entries(stats())) this.set({ route }, value(snapshot))
    }
  })
  const counter = <L extends string>(name: string, help: string, labelNames: L[], fill: (add: (labels: Record<L, string>, value: number) => void) => void): Counter<L> =>
    new Counter<L>({
      name,
      help,
      labelNames: ['route', ...labelNames] as L[],
      registers,
      collect () {
        this.reset()
        fill((labels, value) => { if (value > 0) this.inc(labels as never, value) })
      }
    })
  const metrics = [
    perRoute('wstunnel_bridges_open', 'Bridges open now', route => route.open),
    counter('wstunnel_bridges_opened_total', 'Bridges opened', [], add => {
      for (const [route, snapshot] of Object.entries(stats())) add({ route } as never, snapshot.opened)
    }),
    counter('wstunnel_bridges_closed_total', 'Bridges closed, by close code and by the side that closed first', ['code', 'side'], add => {
      for (const [route, counters] of routes()) {
        for (const [key, count] of counters.closedByKey) {
          const [code, side] = key.split(' ')
          add({ route, code, side } as never, count)
        }
      }
    }),
    counter('wstunnel_handshakes_refused_total', 'Handshakes refused before the upgrade, by reason', ['reason'], add => {
      for (const [route, snapshot] of Object.entries(stats())) for (const [reason, count] of Object.entries(snapshot.refused)) add({ route, reason } as never, count)
    }),
    counter('wstunnel_bytes_total', 'Payload bytes bridged, by direction', ['direction'], add => {
      for (const [route, snapshot] of Object.entries(stats())) {
        add({ route, direction: 'client_to_upstream' } as never, snapshot.bytes.clientToUpstream)
        add({ route, direction: 'upstream_to_client' } as never, snapshot.bytes.upstreamToClient)
      }
    })
  ]
  const connect = new Histogram({
    name: 'wstunnel_upstream_connect_seconds',
    help: 'Time for an upstream to accept, failover included',
    labelNames: ['route'],
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers
  })
  return {
    observe (route, seconds) { connect.observe({ route }, seconds) },
    remove () {
      for (const metric of [...metrics, connect]) registry.removeSingleMetric((metric as unknown as { name: string }).name)
    }
  }
}
