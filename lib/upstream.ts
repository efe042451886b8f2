import { connect, isIP, type Socket } from 'node:net'
import { connect as tlsConnect, TLSSocket } from 'node:tls'
import type { UpstreamTarget } from './options'
import { ShuttingDownError } from './errors'
import { SHARED_READ_BUFFER } from './read-buffer'

// An upstream reads into the shared buffer (read-buffer.ts) while its reads are small. A large read means
// bulk: if its reader can keep what it is given, the socket then reads into a buffer of its own, and a large
// read there is the reader's to keep (the bytes are handed on without a copy), the socket getting a fresh
// buffer for its next read; a small read sends it back to the shared buffer. So no buffer a reader was given
// to keep is ever read into again, by this socket or any other; a kept buffer is at least half full; and a
// socket holds a buffer of its own only in bulk, or when it went quiet right after a bulk read (Node swaps a
// socket's read buffer only after a read).
const LARGE_READ = 32 * 1024
const OWN_SIZE = 64 * 1024
/** Bytes free in front of a buffer a reader may keep, for a frame header (frames.ts). */
export const FRAME_HEADROOM = 10

/** Where an upstream's bytes go: `length` bytes of `buffer`. When `owned`, the buffer is the reader's to keep,
 *  with FRAME_HEADROOM free bytes in front; otherwise it is valid only during the call. Return false to stop
 *  reading until `socket.resume()`. */
export type UpstreamReader = (this: Socket, buffer: Buffer, length: number, owned: boolean) => boolean
const kReader = Symbol('wstunnel.reader')
const kEarly = Symbol('wstunnel.early')
const kOwn = Symbol('wstunnel.own-buffer')
const kKeeps = Symbol('wstunnel.reader-keeps')
type ReadingSocket = Socket & { [kReader]: UpstreamReader, [kEarly]: Buffer[] | null, [kOwn]: Buffer | null, [kKeeps]: boolean }

function onUpstreamRead (this: ReadingSocket, length: number, buffer: Buffer): boolean {
  const large = length >= LARGE_READ
  const owned = large && buffer !== SHARED_READ_BUFFER
  // Decided before the reader runs: Node asks for the next buffer as soon as this call returns.
  this[kOwn] = large && this[kKeeps] ? Buffer.allocUnsafe(FRAME_HEADROOM + OWN_SIZE).subarray(FRAME_HEADROOM) : null
  try {
    return this[kReader](buffer, length, owned)
  } catch (err) {
    // Node would not ask for the next buffer, and would read into the one just handed on: the socket goes.
    this.destroy(err as Error)
    return false
  }
}

/** Before a bridge adopts the upstream, what it sends (a server banner) is kept, and reading stops. */
function holdEarly (this: Socket, buffer: Buffer, length: number): boolean {
  ((this as ReadingSocket)[kEarly] ??= []).push(Buffer.from(buffer.subarray(0, length)))
  return false
}

/** Hands the upstream's bytes to `reader` from now on, first those that came before, then resumes reading.
 *  `keeps`: the reader keeps large reads handed to it as owned (else they need no buffer of their own).
 *  A TLS upstream is read the stream way: each decrypted chunk is handed on as not owned. */
export function readUpstream (socket: Socket, reader: UpstreamReader, keeps: boolean): void {
  if (socket instanceof TLSSocket) {
    socket.on('data', function onTlsData (this: Socket, chunk: Buffer) {
      if (reader.call(this, chunk, chunk.length, false) === false) this.pause()
    })
    return
  }
  const reading = socket as ReadingSocket
  const early = reading[kEarly]
  reading[kReader] = reader
  reading[kKeeps] = keeps
  reading[kEarly] = null
  let flowing = true
  if (early !== null) for (const chunk of early) flowing = reader.call(socket, chunk, chunk.length, false) !== false && flowing
  if (flowing) socket.resume()
}

/** Why one connect attempt failed: the OS or TLS error code, or a timeout. */
export class ConnectFailure extends Error {
  constructor (readonly reason: string, readonly timedOut: boolean, options?: ErrorOptions) {
    super(reason, options)
  }
}

/** How long a TLS handshake may take when connectTimeout is 0 (the OS's own, which covers only TCP). */
const TLS_HANDSHAKE_TIMEOUT = 30000

// Keep-alive finds a peer that vanished (a rebooted host) on a bridge that is otherwise idle.
const KEEP_ALIVE_DELAY = 60000

/** Opens a TCP, unix-socket or TLS connection to the upstream, resolving once it is established (for TLS, once
 *  the certificate is verified). Host names are resolved at each connect, IPv6 and IPv4 tried as Node's
 *  autoSelectFamily does. Rejects with a ConnectFailure (refused, TLS error, or no answer within `timeout` ms;
 *  0: the OS's own, and 30 s more for a TLS handshake), or the abort's reason (else a 503 error) if `signal`
 *  aborts first. A PROXY `preamble` goes first, before any TLS. */
export function connectUpstream (target: UpstreamTarget, timeout: number, preamble: Buffer | undefined, signal: AbortSignal): Promise<Socket> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(abortReason(signal))
    const secure = target.tls !== null
    // Node asks for the first buffer inside connect(), before `socket` is assigned.
    let created: ReadingSocket | undefined
    const onread = secure ? undefined : { buffer: () => created?.[kOwn] ?? SHARED_READ_BUFFER, callback: onUpstreamRead }
    const raw = created = ('path' in target
      ? connect({ path: target.path, onread })
      : connect({ host: target.host, port: target.port, noDelay: true, keepAlive: true, keepAliveInitialDelay: KEEP_ALIVE_DELAY, autoSelectFamily: true, onread })) as ReadingSocket
    raw[kReader] = holdEarly
    raw[kEarly] = null
    raw[kOwn] = null
    raw[kKeeps] = false
    // From here on an error needs a listener, whoever else listens: until a bridge adopts the upstream
    // (a reset while the upgrade completes), nothing else does, and the socket destroys itself.
    raw.on('error', ignore)
    let socket: Socket = raw
    const onTimeout = (): void => { settle(new ConnectFailure(`timed out after ${timeout > 0 ? timeout : TLS_HANDSHAKE_TIMEOUT} ms`, true)) }
    let timer = timeout > 0 ? setTimeout(onTimeout, timeout) : null
    function settle (error: Error | null): void {
      if (timer !== null) clearTimeout(timer)
      raw.removeListener('connect', onConnect)
      socket.removeListener('secureConnect', onSecure)
      socket.removeListener('error', onError)
      signal.removeEventListener('abort', onAbort)
      if (error === null) return
      socket.destroy()
      raw.destroy()
      reject(error)
    }
    function onConnect (): void {
      if (preamble !== undefined) raw.write(preamble)
      if (!secure) {
        settle(null)
        return resolve(raw)
      }
      raw.removeListener('error', onError)
      // The OS bounds a TCP connect, but nothing bounds a TLS handshake with a server that says nothing.
      timer ??= setTimeout(onTimeout, TLS_HANDSHAKE_TIMEOUT)
      socket = tlsConnect({ ...target.tls, socket: raw, servername: target.tls?.servername ?? servernameOf(target) })
      socket.on('error', ignore)
      socket.once('secureConnect', onSecure)
      socket.once('error', onError)
    }
    function onSecure (): void {
      settle(null)
      resolve(socket)
    }
    function onError (err: NodeJS.ErrnoException): void {
      settle(new ConnectFailure(err.code ?? err.message, false, { cause: err }))
    }
    function onAbort (): void {
      settle(abortReason(signal))
    }
    raw.once('connect', onConnect)
    raw.once('error', onError)
    signal.addEventListener('abort', onAbort)
  })
}

/** Why the connect was called off: the signal's reason if it is an Error, else the server is shutting down. */
function abortReason (signal: AbortSignal): Error {
  return signal.reason instanceof Error && signal.reason.name !== 'AbortError' ? signal.reason : new ShuttingDownError()
}

/** SNI names a host, never an address (RFC 6066 section 3). */
function servernameOf (target: UpstreamTarget): string | undefined {
  return 'host' in target && isIP(target.host) === 0 ? target.host : undefined
}

function ignore (): void {}
