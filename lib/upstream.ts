import { connect, type Socket } from 'node:net'
import type { UpstreamTarget } from './options'
import { UpstreamTimeoutError, UpstreamUnreachableError } from './errors'
import { FRAME_HEADROOM, currentReadBuffer, takeReadBuffer } from './read-buffer'

// Upstreams read into the shared read buffer (read-buffer.ts). A small read is copied out (into Node's
// pooled memory); a large one is handed on as it is, and the buffer taken. Either way the bytes handed on
// have FRAME_HEADROOM bytes of their own in front, for a frame header.
const LARGE_READ = 16 * 1024

function onUpstreamRead (this: ReadingSocket, length: number, buffer: Buffer): boolean {
  let chunk: Buffer
  if (length >= LARGE_READ) {
    chunk = buffer.subarray(0, length)
    takeReadBuffer()
  } else {
    chunk = Buffer.allocUnsafe(FRAME_HEADROOM + length).subarray(FRAME_HEADROOM)
    buffer.copy(chunk, 0, 0, length)
  }
  return this[kReader](chunk)
}

/** Where an upstream's bytes go: return false to stop reading until `socket.resume()`. */
export type UpstreamReader = (this: Socket, chunk: Buffer) => boolean
const kReader = Symbol('wstunnel.reader')
const kEarly = Symbol('wstunnel.early')
type ReadingSocket = Socket & { [kReader]: UpstreamReader, [kEarly]: Buffer[] | null }

/** Before a bridge adopts the upstream, what it sends (a server banner) is kept, and reading stops. */
function holdEarly (this: Socket, chunk: Buffer): boolean {
  ((this as ReadingSocket)[kEarly] ??= []).push(chunk)
  return false
}

/** Hands the upstream's bytes to `reader` from now on, first those that came before, then resumes reading. */
export function readUpstream (socket: Socket, reader: UpstreamReader): void {
  const reading = socket as ReadingSocket
  const early = reading[kEarly]
  reading[kReader] = reader
  reading[kEarly] = null
  let flowing = true
  if (early !== null) for (const chunk of early) flowing = reader.call(socket, chunk) !== false && flowing
  if (flowing) socket.resume()
}

/** Opens a TCP or unix-socket connection to the upstream, resolving once it is established.
 *  Rejects with a 502 error if it is refused, or a 504 error after `timeout` ms. */
export function connectUpstream (target: UpstreamTarget, timeout: number, preamble?: Buffer): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const onread = { buffer: currentReadBuffer, callback: onUpstreamRead }
    const socket = ('path' in target
      ? connect({ path: target.path, onread })
      : connect({ host: target.host, port: target.port, noDelay: true, onread })) as ReadingSocket
    socket[kReader] = holdEarly
    socket[kEarly] = null
    // The socket timeout doubles as the connect timeout; the bridge later reuses it for idleTimeout.
    if (timeout > 0) socket.setTimeout(timeout)
    function onConnect (): void {
      socket.removeListener('error', onError)
      socket.removeListener('timeout', onTimeout)
      socket.setTimeout(0)
      if (preamble !== undefined) socket.write(preamble)
      resolve(socket)
    }
    function onError (err: NodeJS.ErrnoException): void {
      socket.removeListener('timeout', onTimeout)
      socket.destroy()
      reject(new UpstreamUnreachableError(target.label, err.code ?? err.message, { cause: err }))
    }
    function onTimeout (): void {
      socket.removeListener('error', onError)
      // Errors after the verdict only need a listener, so they cannot crash the process.
      socket.on('error', ignore)
      socket.destroy()
      reject(new UpstreamTimeoutError(target.label, timeout))
    }
    socket.once('connect', onConnect)
    socket.once('error', onError)
    socket.once('timeout', onTimeout)
  })
}

function ignore (): void {}
