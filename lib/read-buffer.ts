import type { Socket } from 'node:net'

// Every bridged socket reads through Node's `onread` into this one buffer: no buffer is allocated per read
// and no 'data' event fires. Each socket's handle keeps its own pointer to the buffer it reads into next,
// so the rule that keeps connections apart is absolute: the buffer is read only during a read callback,
// and whatever a reader keeps past that call, it copies. Nothing may ever hand this buffer, or a slice of
// it, to a write, a parser or a queue: another socket's next read would overwrite it.
export const SHARED_READ_BUFFER = Buffer.allocUnsafeSlow(64 * 1024)

/** Where a socket's bytes go: `length` bytes at the start of `buffer`, valid only during the call.
 *  Return false to stop reading until `socket.resume()`. */
export type ReadCallback = (this: Socket, length: number, buffer: Buffer) => boolean
