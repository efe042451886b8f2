import { Socket } from 'node:net'

// Every socket of the bridge reads through Node's `onread` into one shared buffer, skipping the stream
// machinery: no buffer allocated per read, no 'data' event. Reads happen one at a time and each is handed
// on before the next, so one buffer serves them all; a reader that keeps bytes of it past the read takes
// the buffer (`takeReadBuffer`) and a fresh one serves the next read.

/** Bytes free in front of every read buffer, for the largest frame header (`binaryFrame` in frames.ts). */
export const FRAME_HEADROOM = 10
const READ_SIZE = 64 * 1024

/** Where a socket's bytes go: `length` bytes at the start of `buffer`, valid only during the call.
 *  Return false to stop reading until `socket.resume()`. */
export type ReadCallback = (this: Socket, length: number, buffer: Buffer) => boolean

let readBuffer = freshBuffer()

function freshBuffer (): Buffer {
  return Buffer.allocUnsafe(FRAME_HEADROOM + READ_SIZE).subarray(FRAME_HEADROOM)
}

/** The buffer the next read goes into (Node asks for it after every read). */
export function currentReadBuffer (): Buffer {
  return readBuffer
}

/** Hands the current read buffer to the caller to keep; the next read goes into a fresh one. */
export function takeReadBuffer (): void {
  readBuffer = freshBuffer()
}

// A socket created without `onread` reads through the stream machinery. net.Socket keeps its onread
// settings under these symbols, found by name on a socket with no handle; where they are not found, or the
// handle cannot take a buffer of ours, the socket keeps reading the stream way.
const onread = onreadSymbols()

function onreadSymbols (): { buffer: symbol, callback: symbol, generator: symbol } | null {
  const probe = new Socket()
  const byName = new Map(Object.getOwnPropertySymbols(probe).map(symbol => [symbol.description, symbol]))
  const buffer = byName.get('kBuffer')
  const callback = byName.get('kBufferCb')
  const generator = byName.get('kBufferGen')
  return buffer !== undefined && callback !== undefined && generator !== undefined ? { buffer, callback, generator } : null
}

type Handle = { useUserBuffer?: (buffer: Uint8Array) => void } | null
type OnreadSocket = Socket & { _handle?: Handle, encrypted?: boolean } & Record<symbol, unknown>

/** Switches an open socket (TCP or unix, not TLS) to read as if it had been created with `onread: { buffer:
 *  currentReadBuffer, callback }`. Returns false, changing nothing, where that cannot be done. */
export function readIntoSharedBuffer (socket: Socket, callback: ReadCallback): boolean {
  const target = socket as OnreadSocket
  const handle = target._handle
  if (onread === null || target.encrypted !== undefined || typeof handle?.useUserBuffer !== 'function' ||
    target[onread.buffer] !== null || target[onread.callback] !== null) return false
  target[onread.buffer] = readBuffer
  target[onread.callback] = callback
  target[onread.generator] = currentReadBuffer
  handle.useUserBuffer(readBuffer)
  return true
}
