import type { ClosedBy } from './bridge'

/** Why a handshake was refused, as stats and metrics count it. */
export type RefusalReason = 'origin' | 'subprotocol' | 'limit' | 'upstream' | 'handshake' | 'target' | 'shutdown' | 'client_gone' | 'other'

// Each error code the plugin refuses a handshake with, and the reason it counts as; anything else (an app's own
// hook answering 401, say) is 'other'.
const REASONS: Record<string, RefusalReason> = {
  FST_WSTUNNEL_ORIGIN_FORBIDDEN: 'origin',
  FST_WSTUNNEL_SUBPROTOCOL_REFUSED: 'subprotocol',
  FST_WSTUNNEL_BAD_SUBPROTOCOL_HEADER: 'subprotocol',
  FST_WSTUNNEL_TOO_MANY_CONNECTIONS: 'limit',
  FST_WSTUNNEL_TOO_MANY_FROM_CLIENT: 'limit',
  FST_WSTUNNEL_RATE_LIMITED: 'limit',
  FST_WSTUNNEL_TOO_MANY_PENDING: 'limit',
  FST_WSTUNNEL_UPSTREAM_UNREACHABLE: 'upstream',
  FST_WSTUNNEL_UPSTREAM_TIMEOUT: 'upstream',
  FST_WSTUNNEL_BAD_HANDSHAKE: 'handshake',
  FST_WSTUNNEL_UPGRADE_REQUIRED: 'handshake',
  FST_WSTUNNEL_UNKNOWN_TOKEN: 'target',
  FST_WSTUNNEL_NO_UPSTREAM: 'target',
  FST_WSTUNNEL_BAD_TARGET: 'target',
  FST_WSTUNNEL_TARGET_FORBIDDEN: 'target',
  FST_WSTUNNEL_INVALID_UPSTREAM: 'target',
  FST_WSTUNNEL_SHUTTING_DOWN: 'shutdown',
  FST_WSTUNNEL_CLIENT_GONE: 'client_gone'
}

/** The reason an error refusing a handshake counts as. */
export function refusalReason (code: string | undefined): RefusalReason {
  return (code !== undefined ? REASONS[code] : undefined) ?? 'other'
}

/** One route's counters, or their total, as `fastify.wstunnel.stats()` returns them. */
export interface RouteStatsSnapshot {
  /** Bridges open now. */
  open: number
  /** Bridges opened since the start. */
  opened: number
  /** Bridges closed, by close code (1005: none; 3xxx and 4xxx: an application's) and by the side that closed first. */
  closed: { total: number, byCode: Record<string, number>, bySide: Record<ClosedBy, number> }
  refused: Record<RefusalReason, number>
  /** Payload bytes each way, of closed and open bridges. */
  bytes: { clientToUpstream: number, upstreamToClient: number }
  /** Time from the first connect attempt to an upstream accepting, failover included. */
  upstreamConnect: { count: number, totalMs: number, maxMs: number }
}

/** What a bridge tells its route's stats when it closes. */
export interface ClosedBridge { code: number | undefined, closedBy: ClosedBy | undefined, clientToUpstream: number, upstreamToClient: number }

/** A route's counters. Updated once per handshake and once per bridge, never per message; bytes of open bridges
 *  are added when the stats are read. */
export class RouteStats {
  /** The route's bridges from open until both sides have closed: their bytes are read from them. */
  readonly live = new Set<{ bytes: () => { clientToUpstream: number, upstreamToClient: number } }>()
  opened = 0
  readonly closedByKey = new Map<string, number>() // `${code} ${side}`: the Prometheus series too
  closedTotal = 0
  readonly refused = emptyRefused()
  bytesUp = 0
  bytesDown = 0
  connects = 0
  connectMs = 0
  connectMaxMs = 0
  /** Also told each connect time, in seconds (the Prometheus histogram), when metrics are on. */
  observeConnect: ((seconds: number) => void) | null = null

  refuse (reason: RefusalReason): void {
    this.refused[reason]++
  }

  connected (ms: number): void {
    this.connects++
    this.connectMs += ms
    if (ms > this.connectMaxMs) this.connectMaxMs = ms
    this.observeConnect?.(ms / 1000)
  }

  closed ({ code, closedBy, clientToUpstream, upstreamToClient }: ClosedBridge): void {
    const key = `${codeClass(code ?? 1005)} ${closedBy ?? 'gateway'}`
    this.closedByKey.set(key, (this.closedByKey.get(key) ?? 0) + 1)
    this.closedTotal++
    this.bytesUp += clientToUpstream
    this.bytesDown += upstreamToClient
  }

  /** The counters, with the bytes of the route's live bridges added. */
  snapshot (): RouteStatsSnapshot {
    const live = { clientToUpstream: 0, upstreamToClient: 0 }
    for (const bridge of this.live) {
      const bytes = bridge.bytes()
      live.clientToUpstream += bytes.clientToUpstream
      live.upstreamToClient += bytes.upstreamToClient
    }
    const byCode: Record<string, number> = {}
    const bySide: Record<ClosedBy, number> = { client: 0, upstream: 0, gateway: 0 }
    for (const [key, count] of this.closedByKey) {
      const [code, side] = key.split(' ') as [string, ClosedBy]
      byCode[code] = (byCode[code] ?? 0) + count
      bySide[side] += count
    }
    return {
      open: this.opened - this.closedTotal,
      opened: this.opened,
      closed: { total: this.closedTotal, byCode, bySide },
      refused: { ...this.refused },
      bytes: { clientToUpstream: this.bytesUp + live.clientToUpstream, upstreamToClient: this.bytesDown + live.upstreamToClient },
      upstreamConnect: { count: this.connects, totalMs: this.connectMs, maxMs: this.connectMaxMs }
    }
  }
}

/** The sum of route snapshots. */
export function totalOf (snapshots: RouteStatsSnapshot[]): RouteStatsSnapshot {
  const total = new RouteStats().snapshot()
  for (const route of snapshots) {
    total.open += route.open
    total.opened += route.opened
    total.closed.total += route.closed.total
    for (const [code, count] of Object.entries(route.closed.byCode)) total.closed.byCode[code] = (total.closed.byCode[code] ?? 0) + count
    for (const side of ['client', 'upstream', 'gateway'] as const) total.closed.bySide[side] += route.closed.bySide[side]
    for (const reason of Object.keys(route.refused) as RefusalReason[]) total.refused[reason] += route.refused[reason]
    total.bytes.clientToUpstream += route.bytes.clientToUpstream
    total.bytes.upstreamToClient += route.bytes.upstreamToClient
    total.upstreamConnect.count += route.upstreamConnect.count
    total.upstreamConnect.totalMs += route.upstreamConnect.totalMs
    total.upstreamConnect.maxMs = Math.max(total.upstreamConnect.maxMs, route.upstreamConnect.maxMs)
  }
  return total
}

/** A close code as counted: the codes RFC 6455 and IANA define as they are, an application's (3000-4999) by
 *  its thousand, so that clients cannot make a metric series per code they choose. */
export function codeClass (code: number): string {
  if (code >= 1000 && code <= 1015) return String(code)
  if (code >= 3000 && code <= 4999) return `${Math.floor(code / 1000)}xxx`
  return 'other'
}

function emptyRefused (): Record<RefusalReason, number> {
  return { origin: 0, subprotocol: 0, limit: 0, upstream: 0, handshake: 0, target: 0, shutdown: 0, client_gone: 0, other: 0 }
}
