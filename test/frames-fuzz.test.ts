import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import { isUtf8 } from 'node:buffer'
import { randomInt } from 'node:crypto'
import { dirname, join } from 'node:path'
import type { Writable } from 'node:stream'
import { ClientFrameReader, type FrameTarget, type MessageLimits } from '../lib/frames'

// Differential fuzzing of ClientFrameReader (with a ws Receiver for its control frames, as the bridge runs
// it) against ws's own Receiver, on seeded random sequences of client frames, valid and not, cut at random
// points into reads. Each case is generated from its own seed, so one case reruns alone:
//   FRAMES_FUZZ_SEED=<seed> FRAMES_FUZZ_CASE=<index> npx tsx --test test/frames-fuzz.test.ts
// FRAMES_FUZZ_CASES sets how many cases a run makes.
//
// The documented differences, and only those, are allowed:
// - The reader streams: on an ending by error, ws's bytes (whole messages) are a prefix of ours, and ours a
//   prefix of all the data frames' payloads; without an error, ours also hold the part of the message in
//   progress that came before the close frame or the end of the input (a text message's whole characters).
// - The reader may fail with 1007 earlier than ws, when the text message in progress already holds
//   invalid UTF-8 in what was read (RFC 6455 section 8.1); the generator's bytes must confirm it.

// ws's package exports do not list lib/, so its files are required by path: the same modules ws uses.
const requireWs = createRequire(__filename)
const wsLib = join(dirname(requireWs.resolve('ws')), 'lib')
const Receiver = requireWs(join(wsLib, 'receiver.js')) as new (options: { isServer: boolean } & MessageLimits) => WsReceiver
const { kStatusCode } = requireWs(join(wsLib, 'constants.js')) as { kStatusCode: symbol }

type WsReceiver = Writable & { _errored: boolean }

const CONTINUATION = 0
const TEXT = 1
const BINARY = 2
const CLOSE = 8
const PING = 9
const PONG = 10
const MAX_SAFE_HIGH = 0x1fffff // the high 32 bits of 2^53 - 1

const CASES = Number(process.env.FRAMES_FUZZ_CASES ?? 6000)
const SEED = process.env.FRAMES_FUZZ_SEED === undefined ? randomInt(2 ** 31) : Number(process.env.FRAMES_FUZZ_SEED)
const ONLY_CASE = process.env.FRAMES_FUZZ_CASE === undefined ? -1 : Number(process.env.FRAMES_FUZZ_CASE)

// --- Seeded randomness ----------------------------------------------------------------------------------

/** mulberry32: a small seeded PRNG, good enough to pick frames and cuts. */
class Random {
  private state: number

  constructor (seed: number) {
    this.state = seed >>> 0
  }

  /** Returns a number in [0, 1). */
  next (): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }

  /** Returns an integer in [low, high]. */
  between (low: number, high: number): number {
    return low + Math.floor(this.next() * (high - low + 1))
  }

  chance (p: number): boolean {
    return this.next() < p
  }

  pick<T> (items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)]
  }

  bytes (length: number): Buffer {
    const bytes = Buffer.allocUnsafe(length)
    for (let i = 0; i < length; i++) bytes[i] = (this.next() * 256) | 0
    return bytes
  }
}

function caseSeed (seed: number, index: number): number {
  return (Math.imul(seed ^ 0x5bd1e995, 0x9e3779b1) + Math.imul(index + 1, 0x85ebca6b)) >>> 0
}

// --- UTF-8 ----------------------------------------------------------------------------------------------

/** Returns how many leading bytes of a valid UTF-8 prefix end on a character boundary. */
function wholeCharacters (bytes: Buffer): number {
  for (let i = bytes.length - 1; i >= 0 && i >= bytes.length - 3; i--) {
    const byte = bytes[i]
    if ((byte & 0xc0) === 0x80) continue
    const size = byte < 0x80 ? 1 : byte < 0xe0 ? 2 : byte < 0xf0 ? 3 : 4
    return i + size > bytes.length ? i : bytes.length
  }
  return bytes.length
}

/** Returns valid UTF-8 of at most `length` bytes (and at least `length - 3`): ASCII and 2, 3, 4-byte characters. */
function randomText (rng: Random, length: number): Buffer {
  const characters: string[] = []
  let size = 0
  while (size < length) {
    const r = rng.next()
    let codePoint
    if (r < 0.55) {
      codePoint = rng.between(0, 0x7f)
      size += 1
    } else if (r < 0.7) {
      codePoint = rng.between(0x80, 0x7ff)
      size += 2
    } else if (r < 0.85) {
      codePoint = rng.between(0x800, 0xfffd)
      if (codePoint >= 0xd800 && codePoint <= 0xdfff) codePoint = 0x2603
      size += 3
    } else {
      codePoint = rng.between(0x10000, 0x10ffff)
      size += 4
    }
    characters.push(String.fromCodePoint(codePoint))
  }
  const text = Buffer.from(characters.join(''))
  return text.subarray(0, wholeCharacters(text.subarray(0, length)))
}

// Each is invalid wherever it is put between whole characters.
const INVALID_UTF8 = [
  [0xff], [0xfe], [0x80], [0xbf], [0xc0, 0x80], [0xc1, 0xbf], [0xe0, 0x80, 0x80], [0xed, 0xa0, 0x80],
  [0xed, 0xbf, 0xbf], [0xf4, 0x90, 0x80, 0x80], [0xf5, 0x80, 0x80, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80],
  [0xe2, 0x28, 0xa1], [0xc3, 0x28], [0xf0, 0x28, 0x8c, 0xbc], [0xf0, 0x80, 0x80, 0x80]
]
// The start of a character, for a message that ends inside one.
const CUT_CHARACTER = [[0xc3], [0xe2], [0xe2, 0x82], [0xf0], [0xf0, 0x9f], [0xf0, 0x9f, 0x98]]

const VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
const INVALID_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]

// --- Frames and cases -----------------------------------------------------------------------------------

/** data: its payload is part of a message; control: a ping or pong; end: the frame the case ends with (a
 *  close frame or a fault); trailing: sent after that end, never to be read. */
type Role = 'data' | 'control' | 'end' | 'trailing'

interface Frame {
  opcode: number
  fin: boolean
  rsv: number
  masked: boolean
  key: Buffer
  form: 7 | 16 | 64 // how the length is written
  declared: bigint // the length written in the header
  payload: Buffer // the bytes that follow the header, unmasked (fewer than declared when a header lies)
  role: Role
  message: number // the index of its message, for data frames
  note: string
}

/** How a Receiver stopped: by an error with its status code, or by a close frame with its code. */
interface Ending { by: 'error' | 'close' | 'fault', code: number }

interface Case {
  kind: string
  limits: MessageLimits
  frames: Frame[]
  expected: Ending | null // how ws's Receiver ends, by the generator's design
  via: 'reader' | 'control' | null // for our side: a fault of the reader, or the control frames' receiver
}

/** Builds one case's frames from the generator's plan. */
class CaseBuilder {
  readonly frames: Frame[] = []
  private messages = 0
  expected: Ending | null = null
  via: 'reader' | 'control' | null = null

  constructor (readonly rng: Random, readonly limits: MessageLimits) {}

  add (opcode: number, payload: Buffer, options: Partial<Frame> = {}): Frame {
    const rng = this.rng
    const length = payload.length
    let form: 7 | 16 | 64 = length < 126 ? 7 : length < 0x10000 ? 16 : 64
    // ws accepts a length written longer than it needs to be (not on control frames).
    if (opcode < 8 && rng.chance(0.12)) form = form === 7 && rng.chance(0.5) ? 16 : 64
    const key = rng.chance(0.05) ? Buffer.alloc(4) : rng.bytes(4)
    const frame: Frame = {
      opcode,
      fin: true,
      rsv: 0,
      masked: true,
      key,
      form,
      declared: BigInt(length),
      payload,
      role: opcode >= 8 ? 'control' : 'data',
      message: -1,
      note: '',
      ...options
    }
    this.frames.push(frame)
    return frame
  }

  /** Maybe a ping or a pong (or two), as a client may send between any two frames. */
  controls (probability = 0.2): void {
    while (this.rng.chance(probability)) {
      const rng = this.rng
      const size = rng.chance(0.1) ? 125 : rng.chance(0.2) ? 0 : rng.between(1, 40)
      this.add(rng.chance(0.6) ? PING : PONG, rng.bytes(size))
      probability /= 2
    }
  }

  /** Returns a payload size for a message: mostly small, sometimes 126..70000 bytes, within maxPayload. */
  size (): number {
    const rng = this.rng
    let size: number
    if (rng.chance(0.06)) {
      size = rng.chance(0.3) ? rng.between(126, 400) : rng.chance(0.3) ? rng.between(65530, 65540) : rng.between(126, 70000)
    } else {
      size = rng.chance(0.15) ? 0 : rng.between(1, rng.chance(0.5) ? 12 : 60)
    }
    const { maxPayload } = this.limits
    return maxPayload > 0 ? Math.min(size, maxPayload) : size
  }

  fragmentCount (): number {
    const rng = this.rng
    let count = rng.chance(0.5) ? 1 : rng.chance(0.7) ? rng.between(2, 4) : rng.between(5, 12)
    if (this.limits.maxFragments > 0) count = Math.min(count, this.limits.maxFragments)
    return count
  }

  /** Splits `payload` at random points into `count` fragments (some may be empty). */
  split (payload: Buffer, count: number, mustCutAfter = -1): Buffer[] {
    const rng = this.rng
    const cuts: number[] = []
    for (let i = 1; i < count; i++) cuts.push(rng.between(0, payload.length))
    if (mustCutAfter >= 0 && count > 1 && !cuts.some(cut => cut >= mustCutAfter)) {
      cuts[0] = rng.between(mustCutAfter, payload.length)
    }
    cuts.sort((a, b) => a - b)
    const fragments: Buffer[] = []
    let from = 0
    for (const cut of cuts) {
      fragments.push(payload.subarray(from, cut))
      from = cut
    }
    fragments.push(payload.subarray(from))
    return fragments
  }

  /** Sends `fragments` as one message, with pings and pongs between them; the last frame is final unless
   *  `open`. Returns the message's index. */
  message (opcode: number, fragments: Buffer[], open = false, note = ''): number {
    const message = this.messages++
    fragments.forEach((fragment, i) => {
      if (i > 0) this.controls(0.25)
      const last = i === fragments.length - 1
      this.add(i === 0 ? opcode : CONTINUATION, fragment, { fin: last && !open, message, note })
    })
    return message
  }

  validMessage (open = false): number {
    const opcode = this.rng.chance(0.5) ? TEXT : BINARY
    const size = this.size()
    const payload = opcode === TEXT ? randomText(this.rng, size) : this.rng.bytes(size)
    return this.message(opcode, this.split(payload, this.fragmentCount()), open)
  }

  /** A few whole messages, with pings and pongs around them. */
  prelude (count: number): void {
    for (let i = 0; i < count; i++) {
      this.controls()
      this.validMessage()
    }
    this.controls()
  }

  /** Leaves the case in a message in progress (some fragments sent), or between messages. */
  maybeInside (probability = 0.5): boolean {
    if (!this.rng.chance(probability)) return false
    this.validMessage(true)
    this.controls()
    return true
  }

  end (frame: Frame, expected: Ending, via: 'reader' | 'control'): void {
    frame.role = 'end'
    this.expected = expected
    this.via = via
  }

  /** Frames after the end, which nothing may read. */
  trailing (): void {
    const rng = this.rng
    const count = rng.between(0, 2)
    for (let i = 0; i < count; i++) {
      const opcode = rng.pick([TEXT, BINARY, PING, CONTINUATION])
      this.add(opcode, opcode === TEXT ? randomText(rng, rng.between(1, 20)) : rng.bytes(rng.between(1, 20)), { role: 'trailing' })
    }
  }
}

const KINDS: Array<[string, number]> = [
  ['none', 6], ['none-open', 3], ['close', 5], ['close-inside', 5],
  ['opcode', 4], ['rsv', 4], ['unmasked', 4], ['continuation-outside', 3], ['message-inside', 3],
  ['control-long', 3], ['control-extended-length', 2], ['control-fragmented', 3], ['close-1-byte', 2],
  ['close-code', 3], ['close-reason-utf8', 3], ['too-big', 5], ['too-many-fragments', 5], ['length-over-2^53', 3],
  ['utf8-first', 3], ['utf8-middle', 5], ['utf8-middle-interrupted', 7], ['utf8-end', 3], ['utf8-cut', 4]
]
const KIND_WEIGHT = KINDS.reduce((sum, [, weight]) => sum + weight, 0)

function pickKind (rng: Random): string {
  let r = rng.next() * KIND_WEIGHT
  for (const [kind, weight] of KINDS) {
    r -= weight
    if (r < 0) return kind
  }
  return KINDS[0][0]
}

/** A close frame's payload: empty, a code, or a code and a reason (valid unless told). */
function closePayload (rng: Random, code: number, reason: Buffer | null = null): Buffer {
  const head = Buffer.alloc(2)
  head.writeUInt16BE(code)
  return Buffer.concat([head, reason ?? randomText(rng, rng.between(0, rng.chance(0.1) ? 123 : 20))])
}

function generate (rng: Random): Case {
  const kind = pickKind(rng)
  const limits: MessageLimits = {
    maxPayload: rng.pick([0, 0, 100 * 1024 * 1024, 65536, rng.between(1, 2000)]),
    maxFragments: rng.chance(0.3) ? 8 : rng.chance(0.15) ? rng.between(1, 4) : 0
  }
  if (kind === 'too-big' && limits.maxPayload === 0) limits.maxPayload = rng.pick([rng.between(1, 2000), 65536, 100 * 1024 * 1024])
  if (kind === 'too-many-fragments' && limits.maxFragments === 0) limits.maxFragments = rng.chance(0.7) ? 8 : rng.between(1, 4)
  if (kind.startsWith('utf8-')) {
    // Room for the invalid message (up to 85 bytes, and 2 fragments), so that no limit ends the case first.
    if (limits.maxPayload > 0 && limits.maxPayload < 200) limits.maxPayload = 200
    if (limits.maxFragments === 1) limits.maxFragments = 2
  }
  const b = new CaseBuilder(rng, limits)
  b.prelude(rng.between(0, rng.chance(0.8) ? 3 : 6))
  const fault = 1002

  switch (kind) {
    case 'none':
      break
    case 'none-open':
      b.validMessage(true)
      if (rng.chance(0.5)) b.controls(0.8)
      break
    case 'close':
    case 'close-inside': {
      if (kind === 'close-inside') b.maybeInside(1)
      const empty = rng.chance(0.25)
      const code = rng.pick(VALID_CLOSE_CODES)
      b.end(b.add(CLOSE, empty ? Buffer.alloc(0) : closePayload(rng, code)), { by: 'close', code: empty ? 1005 : code }, 'control')
      break
    }
    case 'opcode': {
      b.maybeInside()
      const opcode = rng.chance(0.6) ? rng.between(3, 7) : rng.between(11, 15)
      b.end(b.add(opcode, rng.bytes(rng.between(0, 10)), { note: 'unknown opcode', fin: rng.chance(0.8) }), { by: 'error', code: fault }, opcode < 8 ? 'reader' : 'control')
      break
    }
    case 'rsv':
    case 'unmasked': {
      // A frame of any kind, where it may come, with a bad header bit.
      const inside = b.maybeInside()
      const control = rng.chance(0.3)
      const opcode = control ? rng.pick([PING, PONG, CLOSE]) : inside ? CONTINUATION : rng.pick([TEXT, BINARY])
      const payload = opcode === CLOSE ? closePayload(rng, 1000) : opcode === TEXT ? randomText(rng, 10) : rng.bytes(rng.between(0, 10))
      const bad = kind === 'rsv' ? { rsv: rng.between(1, 7), note: 'RSV set' } : { masked: false, note: 'unmasked' }
      b.end(b.add(opcode, payload, bad), { by: 'error', code: fault }, control ? 'control' : 'reader')
      break
    }
    case 'continuation-outside':
      b.end(b.add(CONTINUATION, rng.bytes(rng.between(0, 10)), { fin: rng.chance(0.5), note: 'continuation outside a message' }), { by: 'error', code: fault }, 'reader')
      break
    case 'message-inside': {
      b.maybeInside(1)
      const opcode = rng.pick([TEXT, BINARY])
      b.end(b.add(opcode, rng.bytes(rng.between(0, 10)), { fin: rng.chance(0.5), note: 'new message inside one' }), { by: 'error', code: fault }, 'reader')
      break
    }
    case 'control-long': {
      b.maybeInside()
      const opcode = rng.pick([PING, PONG, CLOSE])
      const size = rng.chance(0.5) ? 126 : rng.between(127, 300)
      const payload = opcode === CLOSE ? closePayload(rng, 1000, Buffer.from(randomText(rng, size - 2).toString().padEnd(size - 2, 'a'))) : rng.bytes(size)
      b.end(b.add(opcode, payload, { form: payload.length < 0x10000 ? 16 : 64, note: 'control frame over 125 bytes' }), { by: 'error', code: fault }, 'control')
      break
    }
    case 'control-extended-length': {
      b.maybeInside()
      const opcode = rng.pick([PING, PONG, CLOSE])
      const payload = opcode === CLOSE ? closePayload(rng, 1000) : rng.bytes(rng.between(0, 20))
      b.end(b.add(opcode, payload, { form: rng.pick([16, 64] as const), note: 'control frame with a 16/64-bit length' }), { by: 'error', code: fault }, 'control')
      break
    }
    case 'control-fragmented': {
      b.maybeInside()
      const opcode = rng.pick([PING, PONG, CLOSE])
      const payload = opcode === CLOSE ? closePayload(rng, 1000) : rng.bytes(rng.between(0, 20))
      b.end(b.add(opcode, payload, { fin: false, note: 'control frame with FIN clear' }), { by: 'error', code: fault }, 'control')
      break
    }
    case 'close-1-byte':
      b.maybeInside()
      b.end(b.add(CLOSE, rng.bytes(1), { note: 'close frame of 1 byte' }), { by: 'error', code: fault }, 'control')
      break
    case 'close-code':
      b.maybeInside()
      b.end(b.add(CLOSE, closePayload(rng, rng.pick(INVALID_CLOSE_CODES)), { note: 'invalid close code' }), { by: 'error', code: fault }, 'control')
      break
    case 'close-reason-utf8': {
      b.maybeInside()
      const reason = Buffer.concat([randomText(rng, rng.between(0, 30)), Buffer.from(rng.pick(INVALID_UTF8)), randomText(rng, rng.between(0, 30))])
      b.end(b.add(CLOSE, closePayload(rng, rng.pick(VALID_CLOSE_CODES), reason), { note: 'invalid UTF-8 close reason' }), { by: 'error', code: 1007 }, 'control')
      break
    }
    case 'too-big':
      tooBig(b)
      break
    case 'too-many-fragments': {
      const max = limits.maxFragments
      const opcode = rng.chance(0.5) ? TEXT : BINARY
      const budget = limits.maxPayload > 0 ? Math.min(limits.maxPayload, 200) : 200
      const payload = opcode === TEXT ? randomText(rng, rng.between(0, budget)) : rng.bytes(rng.between(0, budget))
      b.message(opcode, b.split(payload, max), true)
      b.controls()
      const extra = b.add(CONTINUATION, Buffer.alloc(0), { fin: rng.chance(0.5), note: `fragment ${max + 1} of at most ${max}` })
      b.end(extra, { by: 'error', code: 1008 }, 'reader')
      break
    }
    case 'length-over-2^53': {
      const inside = b.maybeInside()
      const high = rng.chance(0.3) ? MAX_SAFE_HIGH + 1 : rng.between(MAX_SAFE_HIGH + 1, 0xffffffff)
      const low = rng.chance(0.3) ? 0 : rng.between(0, 0xffffffff)
      const frame = b.add(inside ? CONTINUATION : rng.pick([TEXT, BINARY]), rng.bytes(rng.between(0, 8)), { form: 64, note: '64-bit length over 2^53' })
      frame.declared = (BigInt(high) << 32n) | BigInt(low)
      b.end(frame, { by: 'error', code: 1009 }, 'reader')
      break
    }
    default:
      invalidText(b, kind)
  }
  if (b.expected !== null) b.trailing()
  return { kind, limits, frames: b.frames, expected: b.expected, via: b.via }
}

/** A message over maxPayload: one frame, or fragments adding up to more. */
function tooBig (b: CaseBuilder): void {
  const rng = b.rng
  const { maxPayload } = b.limits
  let sent = 0
  let opcode = rng.pick([TEXT, BINARY])
  if (rng.chance(0.5)) {
    // Fragments within the limit first.
    const first = opcode === TEXT ? randomText(rng, rng.between(0, Math.min(maxPayload, 100))) : rng.bytes(rng.between(0, Math.min(maxPayload, 100)))
    b.message(opcode, b.split(first, rng.between(1, Math.max(1, Math.min(3, b.limits.maxFragments || 3)))), true)
    b.controls()
    sent = first.length
    opcode = CONTINUATION
  }
  const form = rng.chance(0.1) ? 64 : undefined
  let declared = BigInt(maxPayload - sent + rng.between(1, rng.chance(0.5) ? 1 : 1000))
  if (form === 64 && rng.chance(0.5)) declared = (BigInt(MAX_SAFE_HIGH) << 32n) | BigInt(rng.between(0, 0xffffffff)) // at most 2^53 - 1
  // The payload is sent only where it is small enough to generate; both parsers stop at the header anyway.
  const payload = declared <= 80000n ? rng.bytes(Number(declared)) : rng.bytes(rng.between(0, 16))
  const frame = b.add(opcode, payload, { note: 'message over maxPayload' })
  frame.declared = declared
  frame.form = form ?? (declared < 126n ? 7 : declared < 0x10000n ? 16 : 64)
  b.end(frame, { by: 'error', code: 1009 }, 'reader')
}

/** A text message with invalid UTF-8: in the first or a middle fragment (the message then ends, or is
 *  interrupted by a close frame, a fault or the end of the input), at the end, or a character cut at the end. */
function invalidText (b: CaseBuilder, kind: string): void {
  const rng = b.rng
  const before = randomText(rng, rng.between(0, 40))
  const bad = Buffer.from(kind === 'utf8-cut' ? rng.pick(CUT_CHARACTER) : rng.pick(INVALID_UTF8))
  const after = kind === 'utf8-end' || kind === 'utf8-cut' ? Buffer.alloc(0) : randomText(rng, rng.between(0, 40))
  const payload = Buffer.concat([before, bad, after])
  const max = b.limits.maxFragments > 0 ? b.limits.maxFragments : 12
  let fragments: Buffer[]
  if (kind === 'utf8-first') {
    fragments = [payload]
  } else if (kind === 'utf8-middle' || kind === 'utf8-middle-interrupted') {
    // The bad bytes start before the last cut, so a fragment before the last one holds (some of) them.
    fragments = b.split(payload, Math.max(2, Math.min(max, rng.between(2, 6))), before.length + 1)
  } else {
    fragments = b.split(payload, Math.min(max, rng.between(1, 4)))
  }
  assert.ok(fragments.length <= max && (b.limits.maxPayload === 0 || payload.length <= b.limits.maxPayload), 'generator: within the limits')
  if (kind !== 'utf8-middle-interrupted') {
    b.message(TEXT, fragments, false, 'invalid UTF-8')
    b.end(b.frames[b.frames.length - 1], { by: 'error', code: 1007 }, 'reader')
    b.frames[b.frames.length - 1].role = 'data' // a data frame still: its bytes are the message's
    return
  }
  // Interrupted before its last fragment (which is never sent).
  const last = fragments.length - 1
  const sentFragments = fragments.slice(0, last)
  const message = b.message(TEXT, sentFragments, true, 'invalid UTF-8')
  b.controls()
  const how = rng.pick(['close', 'new-message', 'unmasked', 'too-many-fragments', 'end-of-input', 'control-fault'])
  if (how === 'close') {
    const code = rng.pick(VALID_CLOSE_CODES)
    b.end(b.add(CLOSE, closePayload(rng, code)), { by: 'close', code }, 'control')
  } else if (how === 'new-message') {
    b.end(b.add(rng.pick([TEXT, BINARY]), rng.bytes(3), { note: 'new message inside one' }), { by: 'error', code: 1002 }, 'reader')
  } else if (how === 'unmasked') {
    b.end(b.add(CONTINUATION, randomText(rng, 5), { masked: false, note: 'unmasked' }), { by: 'error', code: 1002 }, 'reader')
  } else if (how === 'too-many-fragments' && b.limits.maxFragments > 0) {
    for (let i = sentFragments.length; i < b.limits.maxFragments; i++) b.add(CONTINUATION, randomText(rng, 3), { fin: false, message })
    b.end(b.add(CONTINUATION, randomText(rng, 3), { note: 'one fragment too many' }), { by: 'error', code: 1008 }, 'reader')
  } else if (how === 'control-fault') {
    b.end(b.add(PING, rng.bytes(3), { fin: false, note: 'control frame with FIN clear' }), { by: 'error', code: 1002 }, 'control')
  }
  // 'end-of-input' (or too-many-fragments without a limit): the message stays open, ws ends with nothing.
}

// --- Encoding and what the generator knows --------------------------------------------------------------

interface Encoded {
  bytes: Buffer
  starts: number[] // where each frame starts
  payloadStarts: number[] // where each frame's payload starts
}

function encode (frames: Frame[]): Encoded {
  const pieces: Buffer[] = []
  const starts: number[] = []
  const payloadStarts: number[] = []
  let at = 0
  for (const frame of frames) {
    const extra = frame.form === 7 ? 0 : frame.form === 16 ? 2 : 8
    const header = Buffer.alloc(2 + extra + (frame.masked ? 4 : 0))
    header[0] = (frame.fin ? 0x80 : 0) | (frame.rsv << 4) | frame.opcode
    if (frame.form === 7) {
      assert.ok(frame.declared < 126n, 'a 7-bit length under 126')
      header[1] = Number(frame.declared)
    } else if (frame.form === 16) {
      header[1] = 126
      header.writeUInt16BE(Number(frame.declared), 2)
    } else {
      header[1] = 127
      header.writeBigUInt64BE(frame.declared, 2)
    }
    if (frame.masked) {
      header[1] |= 0x80
      frame.key.copy(header, 2 + extra)
    }
    const body = Buffer.from(frame.payload)
    if (frame.masked) for (let i = 0; i < body.length; i++) body[i] ^= frame.key[i & 3]
    starts.push(at)
    payloadStarts.push(at + header.length)
    pieces.push(header, body)
    at += header.length + body.length
  }
  return { bytes: Buffer.concat(pieces), starts, payloadStarts }
}

interface MessageInfo {
  opcode: number
  start: number // where its first frame starts in the input
  end: number // where its final frame ends in the input, -1 if none came
  from: number // its first byte's offset in `data`
  to: number
  pieces: Array<{ at: number, from: number, length: number }> // its payloads: in the input, in `data`
}

interface Knowledge {
  data: Buffer // the payloads of all data frames before the end, in order
  messages: MessageInfo[]
  open: MessageInfo | null // the message in progress at the end
}

function know (frames: Frame[], encoded: Encoded): Knowledge {
  const parts: Buffer[] = []
  const messages: MessageInfo[] = []
  let offset = 0
  frames.forEach((frame, i) => {
    if (frame.role !== 'data') return
    let info = messages[frame.message]
    if (info === undefined) {
      info = { opcode: frame.opcode, start: encoded.starts[i], end: -1, from: offset, to: offset, pieces: [] }
      messages[frame.message] = info
    }
    info.pieces.push({ at: encoded.payloadStarts[i], from: offset, length: frame.payload.length })
    parts.push(frame.payload)
    offset += frame.payload.length
    info.to = offset
    if (frame.fin) info.end = encoded.payloadStarts[i] + frame.payload.length
  })
  const last = messages[messages.length - 1]
  return { data: Buffer.concat(parts), messages, open: last !== undefined && last.end === -1 ? last : null }
}

// --- Running both sides ---------------------------------------------------------------------------------

/** A ws Receiver and what it emitted: message payloads, pings and pongs, and how it ended. */
class Observed {
  readonly receiver: WsReceiver
  readonly messages: Buffer[] = []
  readonly controls: string[] = []
  ending: Ending | null = null

  constructor (limits: MessageLimits) {
    this.receiver = new Receiver({ isServer: true, ...limits })
    this.receiver.on('message', (data: Buffer) => { this.messages.push(data) })
    this.receiver.on('ping', (data: Buffer) => { this.controls.push(`ping ${data.toString('hex')}`) })
    this.receiver.on('pong', (data: Buffer) => { this.controls.push(`pong ${data.toString('hex')}`) })
    this.receiver.on('conclude', (code: number) => { this.ending ??= { by: 'close', code } })
    this.receiver.on('error', () => {}) // read synchronously below, from `errored`
  }

  /** Writes `bytes`; returns false once the receiver has ended (a close frame, or an error). */
  write (bytes: Buffer): boolean {
    if (this.ending !== null) return false
    this.receiver.write(bytes)
    if (this.ending === null && this.receiver._errored) {
      const error = this.receiver.errored as (Error & Record<symbol, number>) | null
      this.ending = { by: 'error', code: error?.[kStatusCode] ?? -1 }
    }
    return this.ending === null
  }
}

/** The FrameTarget of a bridge, recorded: data kept by reference (it is the target's), control frames passed
 *  uncopied to a ws Receiver (so are they), and every call after the end noted as a violation. */
class RecordingTarget implements FrameTarget {
  readonly data: Buffer[] = []
  readonly control: Observed
  fault: Ending | null = null
  stopped = false
  read = 0 // the read being pushed
  stoppedInRead = -1
  readonly violations: string[] = []

  constructor (limits: MessageLimits) {
    this.control = new Observed(limits)
  }

  clientData (bytes: Buffer): void {
    if (this.stopped) this.violations.push(`clientData(${bytes.length} bytes) after the end, in read ${this.read}`)
    this.data.push(bytes)
  }

  clientControl (bytes: Buffer): boolean {
    if (this.stopped) this.violations.push(`clientControl(${bytes.length} bytes) after the end, in read ${this.read}`)
    const more = this.control.write(bytes)
    if (!more && !this.stopped) this.stop()
    return more
  }

  clientFault (code: number): void {
    if (this.stopped) this.violations.push(`clientFault(${code}) after the end, in read ${this.read}`)
    this.fault ??= { by: 'fault', code }
    this.stop()
  }

  private stop (): void {
    this.stopped = true
    this.stoppedInRead = this.read
  }

  ending (): Ending | null {
    return this.fault ?? this.control.ending
  }
}

let shared = Buffer.alloc(0) // the one read buffer, as the bridge's SHARED_READ_BUFFER

function garbage (from: number, to: number, read: number): void {
  for (let i = from; i < to; i++) shared[i] = (i * 131 + read * 17 + 0x5a) & 0xff
}

interface Run {
  reference: Observed
  whole: Observed
  target: RecordingTarget
  ranges: Array<[number, number]> // reads: [from, to) in the input
  error: unknown
}

function run (c: Case, bytes: Buffer, cuts: number[], exactView: boolean): Run {
  const reference = new Observed(c.limits)
  const whole = new Observed(c.limits)
  const target = new RecordingTarget(c.limits)
  const reader = new ClientFrameReader(target, c.limits)
  const ranges: Array<[number, number]> = []
  let from = 0
  for (const cut of [...cuts, bytes.length]) {
    ranges.push([from, cut])
    from = cut
  }
  let error: unknown = null
  whole.write(Buffer.from(bytes)) // copies: ws unmasks in place, in the buffers it is given
  for (let i = 0; i < ranges.length; i++) {
    const [start, end] = ranges[i]
    const length = end - start
    reference.write(Buffer.from(bytes.subarray(start, end)))
    if (shared.length < length + 64) {
      shared = Buffer.alloc(length + 64 + 65536)
      garbage(0, shared.length, 0)
    }
    bytes.copy(shared, 0, start, end)
    target.read = i
    try {
      reader.push(exactView ? shared.subarray(0, length) : shared, length)
    } catch (err) {
      error ??= err
    }
    garbage(0, length, i + 1) // the next read overwrites this one: nothing may still refer to it
  }
  return { reference, whole, target, ranges, error }
}

function isPrefix (prefix: Buffer, of: Buffer): boolean {
  return prefix.length <= of.length && prefix.equals(of.subarray(0, prefix.length))
}

function show (ending: Ending | null): string {
  return ending === null ? 'none' : `${ending.by} ${ending.code}`
}

/** For the summary: an ending, the close code left out. */
function kindOf (ending: Ending | null): string {
  return ending?.by === 'close' ? 'close' : show(ending)
}

/** Does the text message in progress at input offset `stop` hold invalid UTF-8 in its bytes before it? */
function invalidTextBefore (k: Knowledge, stop: number, forwarded: number): boolean {
  let message: MessageInfo | null = null
  for (const info of k.messages) if (info.start < stop) message = info
  if (message === null || message.opcode !== TEXT || forwarded < message.from) return false
  const decoder = new TextDecoder('utf-8', { fatal: true })
  try {
    for (const piece of message.pieces) {
      const length = Math.min(piece.length, stop - piece.at)
      if (length > 0) decoder.decode(k.data.subarray(piece.from, piece.from + length), { stream: true })
    }
    if (message.end !== -1 && message.end <= stop) decoder.decode()
  } catch {
    return true
  }
  return false
}

interface Verdict { problems: string[], earlier1007: boolean }

/** Compares one run with ws and with what the generator knows; returns the problems found. */
function judge (c: Case, k: Knowledge, r: Run): Verdict {
  const problems: string[] = []
  let earlier1007 = false
  if (r.error !== null) problems.push(`reader.push threw: ${String((r.error as Error).stack ?? r.error)}`)
  problems.push(...r.target.violations)
  const ws = r.reference.ending
  const ours = r.target.ending()
  const wsBytes = Buffer.concat(r.reference.messages)
  const ourBytes = Buffer.concat(r.target.data)

  // ws itself: the same fed whole as cut, and as the generator designed the case.
  if (show(r.whole.ending) !== show(ws) || !Buffer.concat(r.whole.messages).equals(wsBytes)) {
    problems.push(`ws Receiver fed whole ended ${show(r.whole.ending)}, fed cut ${show(ws)} (or emitted other bytes)`)
  }
  if (show(ws) !== show(c.expected)) problems.push(`generator: expected ws to end ${show(c.expected)}, it ended ${show(ws)}`)

  // Text: every forwarded byte of a text message is a valid UTF-8 prefix, and no read hands on a cut character.
  const prefixOfData = isPrefix(ourBytes, k.data)
  if (!prefixOfData) problems.push(`our ${ourBytes.length} bytes are not a prefix of the ${k.data.length} bytes of the data frames (first difference at ${firstDifference(ourBytes, k.data)})`)
  if (prefixOfData) {
    for (const message of k.messages) {
      if (message.opcode !== TEXT || message.from >= ourBytes.length) continue
      const text = ourBytes.subarray(message.from, Math.min(message.to, ourBytes.length))
      try {
        new TextDecoder('utf-8', { fatal: true }).decode(text, { stream: true })
      } catch {
        problems.push(`forwarded invalid UTF-8 in the text message at ${message.from}: ${text.toString('hex')}`)
      }
    }
    let at = 0
    for (const chunk of r.target.data) {
      for (const message of k.messages) {
        const from = Math.max(at, message.from)
        const to = Math.min(at + chunk.length, message.to)
        if (message.opcode === TEXT && from < to && !isUtf8(ourBytes.subarray(from, to))) {
          problems.push(`one clientData call cut a character of the text message at ${message.from}: [${from}, ${to})`)
        }
      }
      at += chunk.length
    }
  }

  const isError = (ending: Ending | null): boolean => ending !== null && ending.by !== 'close'
  if (!isError(ws) && !isError(ours)) {
    // No error: the same ending, the same messages, plus what we streamed of the message in progress.
    if (show(ws) !== show(ours)) problems.push(`ws ended ${show(ws)}, ours ${show(ours)}`)
    const openFrom = k.open?.from ?? k.data.length
    const open = k.data.subarray(openFrom)
    const expected = k.data.subarray(0, openFrom + (k.open?.opcode === TEXT ? wholeCharacters(open) : open.length))
    if (!wsBytes.equals(k.data.subarray(0, openFrom))) problems.push(`generator: ws emitted ${wsBytes.length} bytes, whole messages hold ${openFrom}`)
    if (!ourBytes.equals(expected)) problems.push(`ours forwarded ${ourBytes.length} bytes, expected ${expected.length} (ws: ${wsBytes.length}; first difference at ${firstDifference(ourBytes, expected)})`)
    if (r.target.control.controls.join() !== r.reference.controls.join()) problems.push(`pings/pongs differ: ws ${r.reference.controls.length}, ours ${r.target.control.controls.length}`)
  } else {
    if (!isPrefix(wsBytes, ourBytes)) problems.push(`ws's ${wsBytes.length} bytes are not a prefix of our ${ourBytes.length} (first difference at ${firstDifference(wsBytes, ourBytes)})`)
    // Our 1007 may come before ws's (whatever ws ends with): the generator's bytes must bear it out.
    const failedFast = ours?.by === 'fault' && ours.code === 1007
    if (failedFast) {
      const stop = r.ranges[r.target.stoppedInRead][1]
      if (!invalidTextBefore(k, stop, ourBytes.length)) {
        problems.push(`ours failed with 1007 (ws: ${show(ws)}), but the text message in progress at input offset ${stop} holds no invalid UTF-8 before it`)
      }
    }
    const sameKind = ws !== null && ours !== null && (ws.by === 'close') === (ours.by === 'close')
    if (ws !== null && ours !== null && ws.code === ours.code && sameKind) {
      const via = ours.by === 'fault' ? 'reader' : 'control'
      if (c.via !== null && via !== c.via) problems.push(`ended ${show(ours)} by the ${via}, expected by the ${c.via}`)
    } else if (failedFast) {
      earlier1007 = true
    } else {
      problems.push(`ws ended ${show(ws)}, ours ${show(ours)}`)
    }
    // The same pings and pongs, but for those ws read after the point where we failed fast.
    const ourControls = r.target.control.controls
    const wsControls = r.reference.controls
    const prefix = ourControls.length <= wsControls.length && ourControls.every((control, i) => control === wsControls[i])
    if (!prefix || (!failedFast && ourControls.length !== wsControls.length)) {
      problems.push(`pings/pongs differ: ws ${wsControls.length}, ours ${ourControls.length}`)
    }
  }
  return { problems, earlier1007 }
}

function firstDifference (a: Buffer, b: Buffer): number {
  const length = Math.min(a.length, b.length)
  for (let i = 0; i < length; i++) if (a[i] !== b[i]) return i
  return length
}

// --- Cuts -----------------------------------------------------------------------------------------------

/** Cut points into reads: none, every byte, a stride, or random points, many near frame boundaries. */
function cutPoints (rng: Random, encoded: Encoded): number[] {
  const length = encoded.bytes.length
  if (length < 2) return []
  const mode = rng.next()
  if (mode < 0.08) return []
  if (mode < 0.16 && length <= 400) return Array.from({ length: length - 1 }, (_, i) => i + 1)
  if (mode < 0.26 && length <= 3000) {
    const stride = rng.between(2, 9)
    const cuts: number[] = []
    for (let at = rng.between(1, stride); at < length; at += stride) cuts.push(at)
    return cuts
  }
  const boundaries = [...encoded.starts, ...encoded.payloadStarts]
  const set = new Set<number>()
  const count = rng.between(1, Math.min(length - 1, 24))
  for (let i = 0; i < count; i++) {
    const at = rng.chance(0.5) ? rng.pick(boundaries) + rng.between(-3, 3) : rng.between(1, length - 1)
    if (at > 0 && at < length) set.add(at)
  }
  return [...set].sort((a, b) => a - b)
}

// --- Reporting ------------------------------------------------------------------------------------------

const OPCODES: Record<number, string> = { 0: 'cont', 1: 'text', 2: 'binary', 8: 'close', 9: 'ping', 10: 'pong' }

function describe (c: Case, encoded: Encoded, cuts: number[], exactView: boolean, index: number): string {
  const lines = [
    `FRAMES_FUZZ_SEED=${SEED} FRAMES_FUZZ_CASE=${index} (case ${index} of seed ${SEED}): ${c.kind}, ` +
      `limits ${JSON.stringify(c.limits)}, expected ws ending ${show(c.expected)}`,
    'frames (at: opcode fin rsv mask length/form [sent] role message note):'
  ]
  c.frames.forEach((frame, i) => {
    const sent = BigInt(frame.payload.length) === frame.declared ? '' : ` [${frame.payload.length} sent]`
    lines.push(`  @${encoded.starts[i]}: ${OPCODES[frame.opcode] ?? `opcode ${frame.opcode}`} fin=${Number(frame.fin)} rsv=${frame.rsv} ` +
      `mask=${frame.masked ? frame.key.toString('hex') : 'none'} length=${frame.declared}/${frame.form}${sent} ${frame.role}` +
      `${frame.message >= 0 ? ` m${frame.message}` : ''}${frame.note === '' ? '' : ` (${frame.note})`}`)
  })
  lines.push(`input ${encoded.bytes.length} bytes, cut at [${cuts.join(', ')}], pushed as ${exactView ? 'a view of the read' : 'the whole shared buffer with a length'}`)
  if (encoded.bytes.length <= 600) lines.push(`input hex: ${encoded.bytes.toString('hex')}`)
  return lines.join('\n')
}

/** Drops cuts and pings/pongs/trailing frames while the case still fails, for a shorter report. */
function shrink (c: Case, cuts: number[], exactView: boolean): { c: Case, cuts: number[] } {
  const fails = (candidate: Case, candidateCuts: number[]): boolean => {
    const encoded = encode(candidate.frames)
    return judge(candidate, know(candidate.frames, encoded), run(candidate, encoded.bytes, candidateCuts, exactView)).problems.length > 0
  }
  let changed = true
  while (changed) {
    changed = false
    for (let i = c.frames.length - 1; i >= 0; i--) {
      const frame = c.frames[i]
      if (frame.role !== 'control' && frame.role !== 'trailing') continue
      const encoded = encode(c.frames)
      const start = encoded.starts[i]
      const size = (encoded.starts[i + 1] ?? encoded.bytes.length) - start
      const candidate = { ...c, frames: c.frames.filter((_, j) => j !== i) }
      const candidateCuts = cuts.filter(cut => cut <= start || cut >= start + size).map(cut => cut >= start + size ? cut - size : cut)
      if (fails(candidate, [...new Set(candidateCuts)].filter(cut => cut > 0))) {
        c = candidate
        cuts = [...new Set(candidateCuts)].filter(cut => cut > 0)
        changed = true
      }
    }
    for (let i = cuts.length - 1; i >= 0; i--) {
      const candidateCuts = cuts.filter((_, j) => j !== i)
      if (fails(c, candidateCuts)) {
        cuts = candidateCuts
        changed = true
      }
    }
  }
  return { c, cuts }
}

// --- The test -------------------------------------------------------------------------------------------

test(`ClientFrameReader against ws's Receiver: ${ONLY_CASE >= 0 ? `case ${ONLY_CASE}` : `${CASES} cases`} of seed ${SEED}`, t => {
  const started = process.hrtime.bigint()
  const byKind = new Map<string, number>()
  const endings = new Map<string, number>()
  let earlier1007 = 0
  let openAtEnd = 0
  let bytes = 0
  let reads = 0
  const first = ONLY_CASE >= 0 ? ONLY_CASE : 0
  const last = ONLY_CASE >= 0 ? ONLY_CASE : CASES - 1
  for (let index = first; index <= last; index++) {
    const rng = new Random(caseSeed(SEED, index))
    const c = generate(rng)
    const encoded = encode(c.frames)
    const cuts = cutPoints(rng, encoded)
    const exactView = rng.chance(0.5)
    const knowledge = know(c.frames, encoded)
    const result = run(c, encoded.bytes, cuts, exactView)
    const verdict = judge(c, knowledge, result)
    if (verdict.problems.length > 0) {
      const small = shrink(c, cuts, exactView)
      const smallEncoded = encode(small.c.frames)
      const smallVerdict = judge(small.c, know(small.c.frames, smallEncoded), run(small.c, smallEncoded.bytes, small.cuts, exactView))
      assert.fail([
        `mismatch in case ${index} of seed ${SEED}:`, ...verdict.problems.map(problem => `  - ${problem}`),
        describe(c, encoded, cuts, exactView, index),
        'shrunk (pings, pongs, trailing frames and cuts dropped while it still fails):',
        ...smallVerdict.problems.map(problem => `  - ${problem}`),
        describe(small.c, smallEncoded, small.cuts, exactView, index)
      ].join('\n'))
    }
    byKind.set(c.kind, (byKind.get(c.kind) ?? 0) + 1)
    const ending = `ws ${kindOf(result.reference.ending)} / ours ${kindOf(result.target.ending())}`
    endings.set(ending, (endings.get(ending) ?? 0) + 1)
    if (verdict.earlier1007) earlier1007++
    if (knowledge.open !== null && knowledge.open.from < knowledge.data.length) openAtEnd++
    bytes += encoded.bytes.length
    reads += cuts.length + 1
  }
  const ms = Number(process.hrtime.bigint() - started) / 1e6
  t.diagnostic(`seed ${SEED}: ${last - first + 1} cases, ${bytes} bytes in ${reads} reads, ${ms.toFixed(0)} ms`)
  t.diagnostic(`kinds: ${[...byKind].map(([kind, count]) => `${kind} ${count}`).join(', ')}`)
  t.diagnostic(`endings: ${[...endings].sort((a, b) => b[1] - a[1]).map(([ending, count]) => `${ending}: ${count}`).join(', ')}`)
  t.diagnostic(`ours failed with 1007 before ws: ${earlier1007}; a message in progress with bytes at the end: ${openAtEnd}`)
})
