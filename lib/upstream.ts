import { connect, type Socket } from 'node:net'
import type { UpstreamTarget } from './options'
import { ShuttingDownError, UpstreamTimeoutError, UpstreamUnreachableError } from './errors'
import { SHARED_READ_BUFFER } from './read-buffer'

/** Where an upstream's bytes go: `length` bytes of `buffer`, valid only during the call (read-buffer.ts).
 *  Return false to stop reading until `socket.resume()`. */
export type UpstreamReader = (this: Socket, buffer: Buffer, length: number) => boolean
const kReader = Symbol('wstunnel.reader')
const kEarly = Symbol('wstunnel.early')
type ReadingSocket = Socket & { [kReader]: UpstreamReader, [kEarly]: Buffer[] | null }

function onUpstreamRead (this: ReadingSocket, length: number, buffer: Buffer): boolean {
  return this[kReader](buffer, length)
}

/** Before a bridge adopts the upstream, what it sends (a server banner) is kept, and reading stops. */
function holdEarly (this: Socket, buffer: Buffer, length: number): boolean {
  ((this as ReadingSocket)[kEarly] ??= []).push(Buffer.from(buffer.subarray(0, length)))
  return false
}

/** Hands the upstream's bytes to `reader` from now on, first those that came before, then resumes reading. */
export function readUpstream (socket: Socket, reader: UpstreamReader): void {
  const reading = socket as ReadingSocket
  const early = reading[kEarly]
  reading[kReader] = reader
  reading[kEarly] = null
  let flowing = true
  if (early !== null) for (const chunk of early) flowing = reader.call(socket, chunk, chunk.length) !== false && flowing
  if (flowing) socket.resume()
}

/** Opens a TCP or unix-socket connection to the upstream, resolving once it is established. Rejects with a
 *  502 error if it is refused, a 504 error after `timeout` ms, or a 503 error if `signal` aborts first. */
export function connectUpstream (target: UpstreamTarget, timeout: number, preamble: Buffer | undefined, signal: AbortSignal): Promise<Socket> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new ShuttingDownError())
    const onread = { buffer: SHARED_READ_BUFFER, callback: onUpstreamRead }
    const socket = ('path' in target
      ? connect({ path: target.path, onread })
      : connect({ host: target.host, port: target.port, noDelay: true, onread })) as ReadingSocket
    socket[kReader] = holdEarly
    socket[kEarly] = null
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
