import { isUtf8 } from 'node:buffer'
import type { Socket } from 'node:net'
import type WebSocket from 'ws'
import { mask as maskInto } from 'bufferutil'
import { SHARED_READ_BUFFER } from './read-buffer'
import { completeLength } from './text-frame'
import { readSocketInto, takeClientBytes } from './private-internals'

// A bridge carries a byte stream, so it needs the bytes of the client's data frames, not whole messages.
// This reader takes them straight off the socket: each read's payloads are unmasked into one buffer of its
// own and handed on in one piece. Messages stream: a message of any size costs the reader no memory, and
// text is checked as UTF-8 as it streams, holding back at most the 3 bytes of a character cut by a read.
// ws still does the rest: the handshake, ping/pong and the closing handshake (control frames go whole to
// its Receiver, which checks and answers them). The other way, an upstream read becomes one binary frame.

const TEXT = 1
const BINARY = 2
const NATIVE_UNMASK = 384 // below this, a JS loop beats the native call (measured here: 150 ns a call)
const EMPTY = Buffer.alloc(0)
const scratchMask = Buffer.alloc(4)
const kReader = Symbol('wstunnel.frame-reader')

/** Where the reader sends what it parsed. */
export interface FrameTarget {
  /** Unmasked payload bytes of the client's data messages, in order, the target's to keep. Text is
   *  valid UTF-8 and never cuts a character. */
  clientData (bytes: Buffer): void
  /** Bytes of a control frame, whole or in pieces, the target's to keep. Returns false when nothing more
   *  is to be read: a close frame has come, or the frame was refused. */
  clientControl (bytes: Buffer): boolean
  /** The client broke the protocol: close with `code` (1002, 1007, 1008, 1009). Nothing more is read. */
  clientFault (code: number, reason: string): void
}

/** Limits on a client message, as ws's maxPayload and maxFragments (0: none). */
export interface MessageLimits {
  maxPayload: number
  maxFragments: number
}

/** Returns an unmasked, final binary frame carrying `length` bytes of `source`: in memory of its own, or,
 *  when `inPlace`, around the bytes where they lie, its header written into the FRAME_HEADROOM bytes
 *  (upstream.ts) in front of them. */
export function binaryFrame (source: Buffer, length: number, inPlace: boolean): Buffer {
  const header = length < 126 ? 2 : length < 0x10000 ? 4 : 10
  const frame = inPlace ? Buffer.from(source.buffer, source.byteOffset - header, length + header) : Buffer.allocUnsafe(header + length)
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
  if (!inPlace) source.copy(frame, header, 0, length)
  return frame
}

/** Reads the client's frames from now on, in place of ws's Receiver, which gets only the control frames.
 *  Returns the socket to write frames to beside ws's Sender, or null, changing nothing, where the bridge
 *  must use ws's 'message' events and `send` (private-internals.ts says when). */
export function readClientFrames (ws: WebSocket, target: FrameTarget, limits: MessageLimits): Socket | null {
  const reader = new ClientFrameReader(target, limits)
  const socket = takeClientBytes(ws, chunk => { reader.push(chunk, chunk.length) })
  if (socket === null) return null
  ;(socket as Socket & { [kReader]: ClientFrameReader })[kReader] = reader
  readSocketInto(socket, SHARED_READ_BUFFER, onClientRead)
  return socket as Socket
}

function onClientRead (this: Socket, length: number, buffer: Buffer): boolean {
  (this as Socket & { [kReader]: ClientFrameReader })[kReader].push(buffer, length)
  return true
}

/** An RFC 6455 frame parser for a server's incoming stream; its memory stays bounded whatever it is fed. */
export class ClientFrameReader {
  private partial: Buffer | null = null // the start of a header cut by the end of a read (< 14 bytes)
  private control = 0 // bytes of a control frame still to pass on
  private left = 0 // payload bytes still to come in the current data frame
  private key = 0 // its masking key
  private keyOffset = 0 // payload bytes of the frame unmasked so far
  private fin = false
  private message = 0 // TEXT or BINARY while a message is in progress
  private messageLength = 0
  private fragments = 0
  private textTail: Buffer | null = null // the start of a character cut by the end of a read (< 4 bytes)
  private done = false
  // Per read: payloads are unmasked into `out`; out[handed, used) is still to hand on, and of a text
  // message in progress, out[textStart, used) is not yet checked.
  private out: Buffer = EMPTY
  private used = 0
  private handed = 0
  private textStart = 0

  constructor (private readonly target: FrameTarget, private readonly limits: MessageLimits) {}

  /** Reads the first `length` bytes of `chunk`, which it does not keep. */
  push (chunk: Buffer, length: number): void {
    if (this.done) return
    if (this.partial !== null) {
      chunk = Buffer.concat([this.partial, chunk.subarray(0, length)])
      length = chunk.length
      this.partial = null
    }
    let i = 0
    while (i < length && !this.done) {
      if (this.control > 0) {
        const count = Math.min(this.control, length - i)
        this.control -= count
        // What came before goes first: a close frame ends the upstream's input.
        if (this.handOnChecked()) {
          // Copied: the target keeps a control frame cut by the end of a read until the rest comes.
          if (!this.target.clientControl(Buffer.from(chunk.subarray(i, i + count)))) this.done = true
        }
        i += count
      } else if (this.left > 0) {
        const count = Math.min(this.left, length - i)
        this.room(length - i)
        this.unmask(chunk, i, count)
        i += count
        this.left -= count
        if (this.left === 0 && this.fin) this.endMessage(0)
      } else {
        const header = this.header(chunk, i, length)
        if (header < 0) {
          this.partial = Buffer.from(chunk.subarray(i, length))
          break
        }
        i += header
      }
    }
    if (!this.done && this.handOnChecked() && this.message === TEXT && this.used > this.textStart) {
      this.textTail = Buffer.from(this.out.subarray(this.textStart, this.used))
    }
    this.out = EMPTY
    this.used = this.handed = this.textStart = 0
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
      this.fragments = 0
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
    const { maxPayload, maxFragments } = this.limits
    if (maxPayload > 0 && this.messageLength > maxPayload) return this.fault(1009, 'message too big')
    if (maxFragments > 0 && ++this.fragments > maxFragments) return this.fault(1008, 'too many message fragments')
    this.key = chunk.readInt32BE(at + length - 4)
    this.keyOffset = 0
    this.left = size
    this.fin = (b0 & 0x80) !== 0
    if (size === 0 && this.fin) this.endMessage(end - at)
    return length
  }

  /** Makes sure `out` has room for `count` more bytes; a cut character from the last read goes first. */
  private room (count: number): void {
    if (this.out !== EMPTY) return
    const tail = this.textTail
    this.out = Buffer.allocUnsafe(count + (tail?.length ?? 0))
    if (tail !== null) {
      tail.copy(this.out, 0)
      this.used = tail.length
      this.textTail = null
    }
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

  /** The last frame of a message is in: a text message must end on a whole character. `remaining` is
   *  what is left of the read, for `out` if a cut character must be placed in it now. */
  private endMessage (remaining: number): void {
    if (this.message === TEXT) {
      if (this.textTail !== null) this.room(remaining)
      if (!this.checkText(true)) return
    }
    this.message = 0
  }

  /** Checks the text in out[textStart, used): all of it when `whole`, else up to its last whole character.
   *  Returns false, having closed with 1007, if it is not UTF-8. */
  private checkText (whole: boolean): boolean {
    const text = this.out.subarray(this.textStart, this.used)
    const end = whole ? text.length : completeLength(text)
    if (!isUtf8(text.subarray(0, end))) {
      this.fault(1007, 'invalid UTF-8 in a text message')
      return false
    }
    this.textStart += end
    return true
  }

  /** Hands on what is ready: all of `out` but a text message's unchecked bytes, which are checked first.
   *  Returns false if they were not UTF-8. */
  private handOnChecked (): boolean {
    let ready = this.used
    if (this.message === TEXT) {
      if (!this.checkText(false)) return false
      ready = this.textStart
    }
    if (ready > this.handed) this.handOn(ready)
    return true
  }

  /** Hands on out[handed, end). A piece under half of `out` (a read of tiny frames) goes as a copy in memory
   *  of its own (not a pool's), so that what waits for the upstream never keeps more than twice its size alive. */
  private handOn (end: number): void {
    let bytes = this.out.subarray(this.handed, end)
    if (bytes.length * 2 < this.out.length) {
      const copy = Buffer.allocUnsafeSlow(bytes.length)
      bytes.copy(copy)
      bytes = copy
    }
    this.target.clientData(bytes)
    this.handed = end
  }

  /** Hands on the messages before the bad frame (but no unchecked text), stops reading, tells the target. */
  private fault (code: number, reason: string): number {
    const ready = this.message === TEXT ? this.textStart : this.used
    if (ready > this.handed) this.handOn(ready)
    this.used = ready
    this.done = true
    this.textTail = null
    this.target.clientFault(code, reason)
    return 0
  }
}
