import { createHash } from 'node:crypto'
import { connect, type Socket } from 'node:net'
import type { FastifyBaseLogger } from 'fastify'
import type { ResolvedRoute, UpstreamTarget } from './options'
import { ConnectFailure, connectUpstream } from './upstream'
import { UpstreamTimeoutError, UpstreamUnreachableError } from './errors'

/** An upstream's state as `fastify.wstunnel.upstreams()` reports it. */
export interface UpstreamStatus {
  upstream: string
  state: 'up' | 'down'
  /** Open bridged connections to it. */
  connections: number
  /** Failed connects in a row. */
  failures: number
  lastError: string | null
  tls: boolean
  /** Chosen per request (a query target, resolveUpstream), not configured. */
  dynamic: boolean
}

/** One upstream of a route, with its passive health. */
export class UpstreamEntry {
  connections = 0
  connecting = 0
  failures = 0
  down = false
  /** When a down upstream may be tried again, before the others that are down. */
  retryAt = 0
  backoff = 0
  lastError: string | null = null
  checking = false
  /** Requests holding this entry between choosing it and their connect's end: a dynamic entry stays till 0. */
  held = 0

  constructor (readonly target: UpstreamTarget, readonly dynamic: boolean, readonly key: string) {}

  status (): UpstreamStatus {
    const { label, tls } = this.target
    return { upstream: label, state: this.down ? 'down' : 'up', connections: this.connections, failures: this.failures, lastError: this.lastError, tls: tls !== null, dynamic: this.dynamic }
  }
}

// Upstreams chosen per request (query targets, resolveUpstream) are remembered while they are in use or down,
// and at most this many: so a client naming many addresses cannot grow the table without bound.
const DYNAMIC_LIMIT = 1024

/** A route's upstreams: which to try first (balance), and what each connect taught (passive health). */
export class RoutePool {
  private readonly entries = new Map<string, UpstreamEntry>()
  private dynamicCount = 0
  /** Round-robin's next turn for each list of upstreams a request may be given (by their keys). */
  private readonly turns = new Map<string, number>()
  private checkTimer: NodeJS.Timeout | null = null
  private readonly probes = new Set<Socket>()

  constructor (readonly route: ResolvedRoute, staticTargets: UpstreamTarget[], private readonly log: FastifyBaseLogger) {
    for (const target of staticTargets) this.entry(target, false)
  }

  /** The entries for these targets, created on first use, held until `connect` is done with them. */
  entriesFor (targets: UpstreamTarget[], dynamic: boolean): UpstreamEntry[] {
    return targets.map(target => {
      const entry = this.entry(target, dynamic)
      entry.held++
      return entry
    })
  }

  private entry (target: UpstreamTarget, dynamic: boolean): UpstreamEntry {
    const key = entryKey(target)
    let entry = this.entries.get(key)
    if (entry === undefined) {
      if (dynamic && ++this.dynamicCount > DYNAMIC_LIMIT) this.evictDynamic()
      entry = new UpstreamEntry(target, dynamic, key)
      this.entries.set(key, entry)
    }
    return entry
  }

  private evictDynamic (): void {
    for (const [key, entry] of this.entries) {
      if (entry.dynamic && entry.connections === 0 && entry.connecting === 0 && entry.held === 0) {
        this.entries.delete(key)
        if (--this.dynamicCount <= DYNAMIC_LIMIT) return
      }
    }
  }

  /** Forgets a dynamic entry once nothing uses it and it is healthy. */
  private release (entry: UpstreamEntry): void {
    if (!entry.dynamic || entry.connections > 0 || entry.connecting > 0 || entry.held > 0 || entry.down || entry.failures > 0) return
    if (this.entries.get(entry.key) === entry) {
      this.entries.delete(entry.key)
      this.dynamicCount--
    }
  }

  /** The order to try `entries` in: those up (or due a retry) by the route's policy, then those down,
   *  soonest retry first, since a down upstream is still tried when all are down. Turns are taken among the
   *  upstreams that are up, so a down one's share is spread over all the others. */
  order (entries: UpstreamEntry[], clientIp: string): UpstreamEntry[] {
    if (entries.length === 1) return entries
    const now = Date.now()
    const policy = this.route.balance
    // client-ip turns the whole list, so that an address keeps its upstream whatever becomes of the others.
    const list = policy === 'client-ip' ? rotate(entries, hash(clientIp) % entries.length) : entries
    let up: UpstreamEntry[] = []
    const down: UpstreamEntry[] = []
    for (const entry of list) (entry.down && entry.retryAt > now ? down : up).push(entry)
    if (up.length > 1 && policy !== 'first' && policy !== 'client-ip') {
      up = rotate(up, policy === 'random' ? Math.floor(Math.random() * up.length) : this.nextTurn(entries) % up.length)
      // A stable sort keeps the turn among equals, so ties still take turns.
      if (policy === 'least-connections') up.sort((a, b) => (a.connections + a.connecting) - (b.connections + b.connecting))
    }
    if (down.length === 0) return up
    down.sort((a, b) => a.retryAt - b.retryAt)
    return [...up, ...down]
  }

  /** The turn of this list of upstreams: lists given alternately (tokens, a sub-protocol map) each take turns of
   *  their own. Lists chosen per request are many: past 1024 of them, the count starts over. */
  private nextTurn (entries: UpstreamEntry[]): number {
    const list = entries.map(entry => entry.key).join('\n')
    const turn = this.turns.get(list) ?? 0
    if (this.turns.size >= 1024 && turn === 0) this.turns.clear()
    this.turns.set(list, turn + 1)
    return turn
  }

  /** Connects to the first of `entries` (in `order`) that accepts, within one connectTimeout for them all:
   *  each attempt gets an equal share of what is left. Rejects with 502, or 504 when every attempt timed
   *  out, naming each upstream tried and its error; with 503 if `signal` aborts. */
  async connect (entries: UpstreamEntry[], preamble: Buffer | undefined, signal: AbortSignal): Promise<{ socket: Socket, entry: UpstreamEntry }> {
    const budget = this.route.connectTimeout
    const deadline = Date.now() + budget
    const tried: string[] = []
    let allTimedOut = true
    for (let index = 0; index < entries.length; index++) {
      const entry = entries[index]
      const left = deadline - Date.now()
      if (budget > 0 && left <= 0) break
      const timeout = budget > 0 ? Math.max(1, Math.floor(left / (entries.length - index))) : 0
      entry.connecting++
      try {
        const socket = await connectUpstream(entry.target, timeout, preamble, signal)
        entry.connecting--
        entry.connections++
        this.succeeded(entry)
        socket.once('close', () => {
          entry.connections--
          this.release(entry)
        })
        this.releaseAll(entries)
        return { socket, entry }
      } catch (err) {
        entry.connecting--
        if (!(err instanceof ConnectFailure)) {
          this.releaseAll(entries)
          throw err // aborted: shutting down, or the client left
        }
        const reason = err.reason
        allTimedOut &&= err.timedOut
        tried.push(`${entry.target.label} ${reason}`)
        this.failed(entry, reason)
      }
    }
    this.releaseAll(entries)
    const details = tried.length === 0 ? 'no time left to try' : tried.join(', ')
    throw allTimedOut
      ? new UpstreamTimeoutError(details, tried.length, entries.length)
      : new UpstreamUnreachableError(details, tried.length, entries.length)
  }

  /** A request is done with its entries: the dynamic ones nothing else uses are forgotten. */
  private releaseAll (entries: UpstreamEntry[]): void {
    for (const entry of entries) entry.held--
    for (const entry of entries) this.release(entry)
  }

  private succeeded (entry: UpstreamEntry): void {
    if (entry.down) this.log.info({ route: this.route.path, upstream: entry.target.label }, 'wstunnel upstream up')
    entry.down = false
    entry.failures = 0
    entry.backoff = 0
    this.release(entry)
  }

  private failed (entry: UpstreamEntry, reason: string): void {
    entry.failures++
    entry.lastError = reason
    if (entry.down) {
      entry.backoff = Math.min(entry.backoff * 2, this.route.failBackoffMax)
    } else if (entry.failures >= this.route.maxFailures) {
      entry.down = true
      entry.backoff = Math.min(this.route.failBackoff, this.route.failBackoffMax)
      this.log.info({ route: this.route.path, upstream: entry.target.label, failures: entry.failures, lastError: reason, retryInMs: entry.backoff }, 'wstunnel upstream down')
    } else {
      return
    }
    entry.retryAt = Date.now() + entry.backoff
  }

  /** Every upstream the route knows, with its state. */
  status (): UpstreamStatus[] {
    return [...this.entries.values()].map(entry => entry.status())
  }

  /** Starts the active health check: a TCP connect to each configured upstream at every interval. */
  startChecks (interval: number): void {
    this.checkTimer = setInterval(() => { this.checkAll(interval) }, interval).unref()
  }

  private checkAll (interval: number): void {
    const timeout = this.route.connectTimeout > 0 ? Math.min(this.route.connectTimeout, interval) : interval
    for (const entry of this.entries.values()) {
      if (entry.dynamic || entry.checking) continue
      entry.checking = true
      const target = entry.target
      const socket = 'path' in target ? connect({ path: target.path }) : connect({ host: target.host, port: target.port })
      this.probes.add(socket)
      const timer = setTimeout(() => { socket.destroy(new Error('ETIMEDOUT')) }, timeout)
      const done = (): void => {
        clearTimeout(timer)
        entry.checking = false
        this.probes.delete(socket)
      }
      socket.once('connect', () => {
        done()
        socket.destroy()
        this.succeeded(entry)
      })
      socket.once('error', (err: NodeJS.ErrnoException) => {
        done()
        this.failed(entry, `health check: ${err.code ?? err.message}`)
      })
    }
  }

  /** Stops the health check, and any check in flight. */
  close (): void {
    if (this.checkTimer !== null) clearInterval(this.checkTimer)
    for (const socket of this.probes) {
      socket.removeAllListeners('connect')
      socket.on('error', () => {})
      socket.destroy()
    }
    this.probes.clear()
  }
}

function rotate<T> (list: T[], start: number): T[] {
  return start === 0 ? list : [...list.slice(start), ...list.slice(0, start)]
}

// Upstreams that differ only in TLS settings (a CA, a servername) are different upstreams: a connection must
// never be made with another's settings. The settings' digest is kept per settings object.
const tlsDigests = new WeakMap<object, string>()

function entryKey (target: UpstreamTarget): string {
  const tls = target.tls
  // By kind and address, not by label: { host: 'unix', port: 80 } and { path: '80' } are both labelled 'unix:80'.
  const address = 'path' in target ? `path ${target.path}` : `tcp ${target.host} ${target.port}`
  if (tls === null) return address
  let digest = tlsDigests.get(tls)
  if (digest === undefined) {
    const { servername, rejectUnauthorized, ca, cert, key } = tls
    digest = createHash('sha256').update(JSON.stringify([servername, rejectUnauthorized, String(ca), String(cert), String(key)])).digest('hex')
    tlsDigests.set(tls, digest)
  }
  return `${address} tls ${digest}`
}

/** FNV-1a: a client address to a stable number. */
function hash (text: string): number {
  let value = 0x811c9dc5
  for (let index = 0; index < text.length; index++) value = Math.imul(value ^ text.charCodeAt(index), 0x01000193)
  return value >>> 0
}
