import { isUtf8 } from 'node:buffer'
import { Writable } from 'node:stream'
import type WebSocket from 'ws'
import type { Socket } from 'node:net'
import { mask as maskInto, unmask as unmaskInPlace } from 'bufferutil'
import { readIntoSharedBuffer, takeReadBuffer } from './read-buffer'

// A bridge carries a byte stream, so it needs the bytes of the client's data frames, not whole messages.
// This reader takes them straight off the socket, read into the shared read buffer (read-buffer.ts): each
// read's payloads are unmasked into one buffer and handed on in one piece. The other way, an upstream read
// becomes one frame written with one call.
// ws still does the rest: the handshake, ping/pong and the closing handshake (control frames go whole to
// its own Receiver, and it sends its own).

const TEXT = 1
const BINARY = 2
const NATIVE_UNMASK = 384 // below this, a JS loop beats the native call (measured here: 150 ns a call)
const IN_PLACE = 16 * 1024 // binary payloads this large in one read are unmasked in place, not copied
const EMPTY = Buffer.alloc(0)
const scratchMask = Buffer.alloc(4)
const kReader = Symbol('wstunnel.frame-reader')
const kSocketReader = Symbol('wstunnel.socket-frame-reader')
const passToReceiver: (this: Writable, chunk: Buffer) => boolean = Writable.prototype.write
const endWritable: (this: Writable) => Writable = Writable.prototype.end

/** Where the reader sends what it parsed. */
export interface FrameTarget {
  /** Unmasked payload bytes of the client's data messages, in order. */
  clientData (bytes: Buffer): void
  /** The client broke the protocol: close with `code` (1002, 1007, 1009). */
  clientFault (code: number, reason: string): void
}

/** Writes an unmasked, final binary-frame header into the FRAME_HEADROOM bytes (read-buffer.ts) that
 *  precede `payload` in its memory, and returns header and payload as one buffer. */
export function binaryFrame (payload: Buffer): Buffer {
  const length = payload.length
  const header = length < 126 ? 2 : length < 0x10000 ? 4 : 10
  const frame = Buffer.from(payload.buffer, payload.byteOffset - header, length + header)
  frame[0] = 0x82
  if (header === 2) {
    frame[1] = length
  } else if (header === 4) {
    frame[1] = 126
    frame.writeUInt16BE(length, 2)
  } else {
    frame[1] = 127
    frame.writeUInt32BE(Math.floor(length / 0x100000000), 2)
    frame.writeUInt32BE(length >>> 0, 6)
  }
  return frame
}

// The parts of ws's WebSocket and Receiver the reader relies on (ws 8; test/frames.test.ts pins them).
type ReceiverWithReader = Writable & { [kReader]: ClientFrameReader, _errored: boolean }
type WebSocketInternals = WebSocket & { _receiver: ReceiverWithReader, _closeFrameReceived: boolean, _socket: Socket }
type SocketWithReader = Socket & { [kSocketReader]: ClientFrameReader }

/** Reads the client's frames from now on, in place of ws's Receiver, which keeps only the control frames.
 *  `maxPayload` (0: none) bounds a message, as it does in ws. Returns false, changing nothing, if this ws
 *  does not have the internals the reader relies on: the caller then listens for ws's 'message' events. */
export function readClientFrames (ws: WebSocket, target: FrameTarget, maxPayload: number): boolean {
  const internals = ws as Partial<WebSocketInternals>
  const receiver = internals._receiver
  if (receiver === undefined || typeof receiver._errored !== 'boolean' || typeof internals._closeFrameReceived !== 'boolean') return false
  const reader = receiver[kReader] = new ClientFrameReader(ws as WebSocketInternals, receiver, target, maxPayload)
  // ws hands every byte it reads to `_receiver.write()`: what came with the upgrade request, and what is left
  // in the socket when it closes. Every later read goes from the socket to the reader, into the shared buffer.
  receiver.write = readerWrite
  receiver.end = receiverEnd
  const socket = (ws as WebSocketInternals)._socket
  if (readIntoSharedBuffer(socket, onClientRead)) {
    (socket as SocketWithReader)[kSocketReader] = reader
    reader.shared = true
  }
  return true
}

function onClientRead (this: Socket, length: number, buffer: Buffer): boolean {
  (this as SocketWithReader)[kSocketReader].push(buffer, length)
  return true
}

// ws ends the Receiver on the close frame and again when the socket ends and closes; each later call makes
// Node build an ERR_STREAM_ALREADY_FINISHED with a stack trace, only to drop it. Skip those calls.
function receiverEnd (this: ReceiverWithReader): ReceiverWithReader {
  if (!this.writableFinished && !this.destroyed) endWritable.call(this)
  return this
}

function readerWrite (this: ReceiverWithReader, chunk: Buffer): boolean {
  this[kReader].push(chunk, chunk.length)
  return true
}

class ClientFrameReader {
  /** True when reads come in the shared read buffer: no part of it may be kept past a read, unless taken. */
  shared = false
  private partial: Buffer | null = null // the start of a header cut by the end of a read
  private control = 0 // bytes of a control frame still to pass to the Receiver
  private left = 0 // payload bytes still to come in the current data frame
  private key = 0 // its masking key
  private keyOffset = 0 // payload bytes of the frame unmasked so far
  private fin = false
  private message = 0 // TEXT or BINARY while a message is in progress
  private messageLength = 0
  private heldText: Buffer[] | null = null // a text message's bytes from earlier reads, held until it is whole
  private done = false
  // Per read: payloads are unmasked into `out`; out[handed, used) is still to hand on.
  private out: Buffer = EMPTY
  private used = 0
  private handed = 0
  private textStart = 0 // where, in out, the text message in progress begins

  constructor (
    private readonly ws: WebSocketInternals,
    private readonly receiver: ReceiverWithReader,
    private readonly target: FrameTarget,
    private readonly maxPayload: number
  ) {}

  /** Reads the first `length` bytes of `chunk`. */
  push (chunk: Buffer, length: number): void {
    if (this.done) return
    let shared = this.shared
    if (this.partial !== null) {
      chunk = Buffer.concat([this.partial, chunk.subarray(0, length)])
      length = chunk.length
      this.partial = null
      shared = false
    }
    this.out = EMPTY
    this.used = 0
    this.handed = 0
    this.textStart = 0
    let i = 0
    while (i < length && !this.done) {
      if (this.control > 0) {
        const count = Math.min(this.control, length - i)
        this.control -= count
        // Copied: the Receiver keeps a control frame cut by the end of a read until the rest comes.
        passToReceiver.call(this.receiver, Buffer.from(chunk.subarray(i, i + count)))
        i += count
        // After a close frame, or a control frame ws refused, nothing more is read.
        if (this.ws._closeFrameReceived || this.receiver._errored) this.done = true
      } else if (this.left > 0) {
        const count = Math.min(this.left, length - i)
        if (count >= IN_PLACE && this.message === BINARY) {
          // A large payload is unmasked where it lies and handed on as it is, after what came before it.
          this.handOn()
          this.turnKey()
          unmaskInPlace(chunk.subarray(i, i + count), scratchMask)
          this.keyOffset += count
          if (shared) {
            takeReadBuffer()
            shared = false
          }
          this.target.clientData(chunk.subarray(i, i + count))
        } else {
          if (this.out.length === 0) this.out = Buffer.allocUnsafe(length - i)
          this.unmask(chunk, i, count)
        }
        i += count
        this.left -= count
        if (this.left === 0 && this.fin) this.endMessage()
      } else {
        const header = this.header(chunk, i, length)
        if (header < 0) {
          this.partial = Buffer.from(chunk.subarray(i, length))
          break
        }
        i += header
      }
    }
    if (this.message === TEXT) {
      // Text is handed on only when its message is whole and valid UTF-8.
      if (this.used > this.textStart && !this.done) (this.heldText ??= []).push(this.out.subarray(this.textStart, this.used))
      this.used = this.textStart
    }
    this.handOn()
    this.out = EMPTY
  }

  /** Reads the frame header at `at`; returns the bytes it took, or -1 if the read ends (at `end`) before it does. */
  private header (chunk: Buffer, at: number, end: number): number {
    const available = end - at
    if (available < 2) return -1
    const b0 = chunk[at]
    const b1 = chunk[at + 1]
    const opcode = b0 & 0x0f
    let size = b1 & 0x7f
    const length = 2 + (size === 126 ? 2 : size === 127 ? 8 : 0) + (b1 & 0x80 ? 4 : 0)
    if (available < length) return -1
    if (opcode >= 8) {
      // Ping, pong and close go whole to ws, which checks and answers them (one over 125 bytes is an error there).
      this.control = size <= 125 ? length + size : length
      return 0
    }
    if ((b0 & 0x70) !== 0) return this.fault(1002, 'RSV bits must be clear')
    if ((b1 & 0x80) === 0) return this.fault(1002, 'client frames must be masked')
    if (opcode === 0) {
      if (this.message === 0) return this.fault(1002, 'continuation frame outside a message')
    } else if (opcode === TEXT || opcode === BINARY) {
      if (this.message !== 0) return this.fault(1002, 'new message before the last one ended')
      this.message = opcode
      this.messageLength = 0
      this.textStart = this.used
    } else {
      return this.fault(1002, `unknown opcode ${opcode}`)
    }
    if (size === 126) {
      size = chunk.readUInt16BE(at + 2)
    } else if (size === 127) {
      const high = chunk.readUInt32BE(at + 2)
      if (high > 0x1fffff) return this.fault(1009, 'message too big') // beyond 2^53 - 1
      size = high * 0x100000000 + chunk.readUInt32BE(at + 6)
    }
    this.messageLength += size
    if (this.maxPayload > 0 && this.messageLength > this.maxPayload) return this.fault(1009, 'message too big')
    this.key = chunk.readInt32BE(at + length - 4)
    this.keyOffset = 0
    this.left = size
    this.fin = (b0 & 0x80) !== 0
    if (size === 0 && this.fin) this.endMessage()
    return length
  }

  /** Puts the masking key in scratchMask, turned to start where the next payload byte falls. */
  private turnKey (): void {
    for (let k = 0; k < 4; k++) scratchMask[k] = (this.key >>> ((3 - ((this.keyOffset + k) & 3)) << 3)) & 0xff
  }

  /** Unmasks `count` payload bytes of `chunk` from `from` onto the end of `out`. */
  private unmask (chunk: Buffer, from: number, count: number): void {
    const out = this.out
    const at = this.used
    this.turnKey()
    if (count >= NATIVE_UNMASK) {
      maskInto(chunk.subarray(from, from + count), scratchMask, out, at, count)
    } else {
      const m0 = scratchMask[0]
      const m1 = scratchMask[1]
      const m2 = scratchMask[2]
      const m3 = scratchMask[3]
      let k = 0
      for (; k + 3 < count; k += 4) {
        out[at + k] = chunk[from + k] ^ m0
        out[at + k + 1] = chunk[from + k + 1] ^ m1
        out[at + k + 2] = chunk[from + k + 2] ^ m2
        out[at + k + 3] = chunk[from + k + 3] ^ m3
      }
      for (; k < count; k++) out[at + k] = chunk[from + k] ^ scratchMask[k & 3]
    }
    this.used += count
    this.keyOffset += count
  }

  /** The last frame of a message is in: text is checked as a whole before any of it is handed on. */
  private endMessage (): void {
    if (this.message === TEXT) {
      const tail = this.out.subarray(this.textStart, this.used)
      if (this.heldText === null) {
        if (!isUtf8(tail)) {
          this.fault(1007, 'invalid UTF-8 in a text message')
          return
        }
      } else {
        const whole = Buffer.concat([...this.heldText, tail])
        this.heldText = null
        if (!isUtf8(whole)) {
          this.fault(1007, 'invalid UTF-8 in a text message')
          return
        }
        // The held bytes come first: hand on what precedes the message, then the message.
        const end = this.used
        this.used = this.textStart
        this.handOn()
        this.target.clientData(whole)
        this.used = this.handed = end
      }
    }
    this.message = 0
  }

  private handOn (): void {
    if (this.used > this.handed) this.target.clientData(this.out.subarray(this.handed, this.used))
    this.handed = this.used
  }

  /** Hands on the messages before the bad frame, stops reading and tells the target. */
  private fault (code: number, reason: string): number {
    if (this.message === TEXT) this.used = this.textStart
    this.handOn()
    this.done = true
    this.heldText = null
    this.target.clientFault(code, reason)
    return 0
  }
}
