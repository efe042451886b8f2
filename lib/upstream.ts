import { connect, type Socket } from 'node:net'
import type { UpstreamTarget } from './options'
import { ShuttingDownError, UpstreamTimeoutError, UpstreamUnreachableError } from './errors'
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
 *  `keeps`: the reader keeps large reads handed to it as owned (else they need no buffer of their own). */
export function readUpstream (socket: Socket, reader: UpstreamReader, keeps: boolean): void {
  const reading = socket as ReadingSocket
  const early = reading[kEarly]
  reading[kReader] = reader
  reading[kKeeps] = keeps
  reading[kEarly] = null
  let flowing = true
  if (early !== null) for (const chunk of early) flowing = reader.call(socket, chunk, chunk.length, false) !== false && flowing
  if (flowing) socket.resume()
}

/** Opens a TCP or unix-socket connection to the upstream, resolving once it is established. Rejects with a
 *  502 error if it is refused, a 504 error after `timeout` ms, or a 503 error if `signal` aborts first. */
export function connectUpstream (target: UpstreamTarget, timeout: number, preamble: Buffer | undefined, signal: AbortSignal): Promise<Socket> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new ShuttingDownError())
    // Node asks for the first buffer inside connect(), before `socket` is assigned.
    let created: ReadingSocket | undefined
    const onread = { buffer: () => created?.[kOwn] ?? SHARED_READ_BUFFER, callback: onUpstreamRead }
    const socket = created = ('path' in target
      ? connect({ path: target.path, onread })
      : connect({ host: target.host, port: target.port, noDelay: true, onread })) as ReadingSocket
    socket[kReader] = holdEarly
    socket[kEarly] = null
    socket[kOwn] = null
    socket[kKeeps] = false
    // From here on an error needs a listener, whoever else listens: until a bridge adopts the upstream
    // (a reset while the upgrade completes), nothing else does, and the socket destroys itself.
    socket.on('error', ignore)
    // The socket timeout doubles as the connect timeout; the bridge later reuses it for idleTimeout.
    if (timeout > 0) socket.setTimeout(timeout)
    function settle (error: Error | null): void {
      socket.removeListener('connect', onConnect)
      socket.removeListener('error', onError)
      socket.removeListener('timeout', onTimeout)
      signal.removeEventListener('abort', onAbort)
      if (error === null) return
      socket.destroy()
      reject(error)
    }
    function onConnect (): void {
      settle(null)
      socket.setTimeout(0)
      if (preamble !== undefined) socket.write(preamble)
      resolve(socket)
    }
    function onError (err: NodeJS.ErrnoException): void {
      settle(new UpstreamUnreachableError(target.label, err.code ?? err.message, { cause: err }))
    }
    function onTimeout (): void {
      settle(new UpstreamTimeoutError(target.label, timeout))
    }
    function onAbort (): void {
      settle(new ShuttingDownError())
    }
    socket.once('connect', onConnect)
    socket.once('error', onError)
    socket.once('timeout', onTimeout)
    signal.addEventListener('abort', onAbort)
  })
}

function ignore (): void {}
