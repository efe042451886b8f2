import { test } from 'node:test'
import assert from 'node:assert/strict'
import { isUtf8 } from 'node:buffer'
import { randomInt } from 'node:crypto'
import type { Socket } from 'node:net'
import WebSocket from 'ws'
import { openClient, startGateway, startTcp, waitFor, type Client, type TcpServer } from './helpers'

// Many bridges at once, each carrying its own seeded bytes, every byte checked both ways. The gateway reads
// its sockets into shared memory (lib/read-buffer.ts): a byte of one connection that lands in another's
// stream shows up here as a difference at a known offset, with the connection it came from. Slow readers keep
// large writes queued in the gateway while the chatters' sockets keep reading, which is when memory still
// held by a write must not be read into again.

const SEED = process.env.INTEGRITY_SEED === undefined ? randomInt(2 ** 31) : Number(process.env.INTEGRITY_SEED)
const KiB = 1024
const MB = 1024 * KiB

type Kind = 'down' | 'up' | 'chat'
interface Plan { kind: Kind, text: boolean, slow: boolean, bytes: number, count: number }

// Linux lets about 4.5 MB into the socket buffers of a reader that reads nothing (tcp_wmem's 4 MB maximum
// plus the receive window) before the gateway's writes queue: a slow flow must carry well past that.
const SLOW_BYTES = 8 * MB
const PLANS: Plan[] = [
  { kind: 'down', text: false, slow: false, bytes: 1 * MB, count: 1 }, // upstream -> client, read as it comes
  { kind: 'up', text: false, slow: false, bytes: 1 * MB, count: 1 }, // client -> upstream, read as it comes
  { kind: 'down', text: false, slow: true, bytes: SLOW_BYTES, count: 1 }, // the client reads slowly
  { kind: 'down', text: true, slow: true, bytes: SLOW_BYTES, count: 1 },
  { kind: 'up', text: false, slow: true, bytes: SLOW_BYTES, count: 1 }, // the upstream reads slowly
  { kind: 'down', text: false, slow: true, bytes: SLOW_BYTES, count: 1 },
  { kind: 'chat', text: false, slow: false, bytes: 0, count: 12 }, // small messages both ways: the upstream echoes
  { kind: 'chat', text: true, slow: false, bytes: 0, count: 6 }
]
const CHAT_MESSAGES = 10000 // at most, per chatter: 1 to 128 bytes each, about one a millisecond
// A slow reader reads nothing for SLOW_START_MS (the kernel's buffers fill), then takes one read every SLOW_MS.
const SLOW_START_MS = 200
const SLOW_MS = 5
const TRANSFERS_MS = 15000 // all the bulk transfers together (about 4 s here); then whatever has not arrived is reported

/** A seeded generator (sfc32, 128 bits of state): the same seed and connection give the same numbers anywhere. */
function generator (seed: number, connection: number): () => number {
  let a = 0x9e3779b9
  let b = seed | 0
  let c = connection | 0
  let d = 1
  const next = (): number => {
    const t = (((a + b) | 0) + d) | 0
    d = (d + 1) | 0
    a = b ^ (b >>> 9)
    b = (c + (c << 3)) | 0
    c = (c << 21) | (c >>> 11)
    c = (c + t) | 0
    return t >>> 0
  }
  for (let i = 0; i < 16; i++) next() // mix the seed in before the first output
  return next
}

function randomBytes (next: () => number, length: number): Buffer {
  const bytes = Buffer.alloc(length + 3)
  for (let i = 0; i < length; i += 4) bytes.writeUInt32LE(next(), i)
  return bytes.subarray(0, length)
}

// Half the characters are multi-byte (2, 3 and 4 bytes), so that reads and frames end inside them.
const CHARACTERS = [...'abcdefghijklmnop ,.\n', ...'éßжΩ—€☃日本語😀𝄞🚀']
const CHARACTER_BYTES = CHARACTERS.map(character => Buffer.byteLength(character))

function randomText (next: () => number, bytes: number): string {
  const characters: string[] = []
  for (let length = 0; length < bytes;) {
    const pick = next() % CHARACTERS.length
    characters.push(CHARACTERS[pick])
    length += CHARACTER_BYTES[pick]
  }
  return characters.join('')
}

/** One direction of one connection: what the sender handed over and what the receiver got, in order. */
class Flow {
  sent: Buffer[] = []
  sentBytes = 0
  received: Buffer[] = []
  receivedBytes = 0
  readonly name: string
  constructor (readonly connection: string, direction: 'client->upstream' | 'upstream->client', private readonly ended: () => boolean) {
    this.name = `${connection} ${direction}`
  }

  send (bytes: Buffer): void {
    this.sent.push(bytes)
    this.sentBytes += bytes.length
  }

  receive (bytes: Buffer): void {
    this.received.push(bytes)
    this.receivedBytes += bytes.length
  }

  /** Everything sent has arrived, or nothing more can. */
  settled (): boolean {
    return this.receivedBytes >= this.sentBytes || this.ended()
  }
}

interface Connection {
  name: string
  plan: Plan
  ws: Client
  upstream: Socket
  up: Flow
  down: Flow
  closed: string // how the connection ended early, '' while open
  problems: string[] // seen on the way: a message of the wrong type, or text that is not UTF-8
}

type Pausable = { pause: () => void, resume: () => void, on: (event: string, listener: () => void) => unknown }

/** Pauses `reader` for SLOW_START_MS, then after each read (`event`) for SLOW_MS: writes towards it fill the
 *  kernel's buffers, then queue in the gateway. Returns a function that lets it read freely again. */
function readSlowly (reader: Pausable, event: 'message' | 'data'): () => void {
  let slow = true
  let timer: NodeJS.Timeout | undefined
  const pauseFor = (ms: number): void => {
    reader.pause()
    timer = setTimeout(() => {
      timer = undefined
      reader.resume()
    }, ms)
  }
  reader.on(event, () => { if (slow && timer === undefined) pauseFor(SLOW_MS) })
  pauseFor(SLOW_START_MS)
  return () => {
    slow = false
    clearTimeout(timer)
    reader.resume()
  }
}

function sleep (ms: number): Promise<void> {
  return new Promise(resolve => setTimeout(resolve, ms))
}

type Send = (piece: Buffer, done: (err?: Error | null) => void) => void

/** Sends `bytes` in pieces of 1 byte to `largest`, one per turn of the event loop once the one before has been
 *  handed to the kernel: the gateway then reads them one at a time, between the chatters' reads. Stops early if
 *  the connection fails or `deadline` (a Date.now() time) passes: the flow then comes up short, which is reported. */
async function sendPaced (send: Send, flow: Flow, bytes: Buffer, largest: number, next: () => number, deadline: number): Promise<void> {
  for (let at = 0; at < bytes.length;) {
    const piece = bytes.subarray(at, at + 1 + (next() % largest))
    flow.send(piece)
    at += piece.length
    const sent = await new Promise<boolean>(resolve => {
      const timer = setTimeout(() => resolve(false), Math.max(0, deadline - Date.now()))
      send(piece, (err) => { clearTimeout(timer); resolve(err == null) })
    })
    if (!sent) return
    await new Promise(resolve => setImmediate(resolve))
  }
}

/** Moves a bulk connection's `bytes` (its reader slowed if the plan says so); resolves once they have arrived. */
async function transfer (connection: Connection, bytes: Buffer, next: () => number, deadline: number): Promise<void> {
  const { plan, ws, upstream } = connection
  const readFreely = plan.slow ? readSlowly(plan.kind === 'down' ? ws : upstream, plan.kind === 'down' ? 'message' : 'data') : () => {}
  try {
    if (plan.kind === 'down') {
      await sendPaced((piece, done) => upstream.write(piece, done), connection.down, bytes, 64 * KiB, next, deadline)
    } else {
      await sendPaced((piece, done) => ws.send(piece, done), connection.up, bytes, 96 * KiB, next, deadline)
    }
    await waitFor(() => connection.up.settled() && connection.down.settled(), deadline - Date.now())
  } finally {
    readFreely()
  }
}

/** The client sends small messages, about one a millisecond, until `stop` or CHAT_MESSAGES. */
async function chat (connection: Connection, next: () => number, stop: () => boolean): Promise<void> {
  const { ws, plan } = connection
  for (let i = 0; i < CHAT_MESSAGES && !stop() && ws.readyState === WebSocket.OPEN; i++) {
    const size = 1 + (next() % 128)
    const message = plan.text ? randomText(next, size) : randomBytes(next, size)
    ws.send(message)
    connection.up.send(Buffer.from(message))
    await sleep(1)
  }
}

/** Index of the first byte where `a` and `b` differ, or -1 if they are equal. */
function firstDifference (a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1
  const length = Math.min(a.length, b.length)
  for (let i = 0; i < length; i++) if (a[i] !== b[i]) return i
  return length
}

/** Looks for the bytes found at `at` in `flow`'s stream among the other connections' data as sent, a few
 *  offsets in: a stray read may start with a frame header of its own. */
function whoseBytes (flow: Flow, received: Buffer, at: number, sent: Map<Flow, Buffer>): string {
  for (let from = at; from < at + 64 && from + 16 <= received.length; from += 4) {
    const needle = received.subarray(from, from + 16)
    // An echoing connection has the same bytes both ways: name the first.
    const found = [...sent].find(([other, bytes]) => other.connection !== flow.connection && bytes.includes(needle))
    if (found !== undefined) return `the bytes at ${from} are ${found[0].name} bytes, sent at offset ${found[1].indexOf(needle)}`
  }
  return 'no 16 bytes near it match another connection\'s data'
}

/** What differs between what each flow sent and what it received, one line per flow or connection. */
function findProblems (connections: Connection[]): string[] {
  const flows = connections.flatMap(connection => [connection.up, connection.down])
  const sent = new Map(flows.map(flow => [flow, Buffer.concat(flow.sent)]))
  const problems: string[] = []
  for (const flow of flows) {
    const expected = sent.get(flow) as Buffer
    const received = Buffer.concat(flow.received)
    const at = firstDifference(expected, received)
    if (at < 0) continue
    if (at === received.length) {
      problems.push(`${flow.name}: got ${received.length} of ${expected.length} bytes, identical so far`)
      continue
    }
    if (at === expected.length) {
      problems.push(`${flow.name}: got ${received.length - expected.length} bytes more than the ${expected.length} sent`)
      continue
    }
    let differing = 0
    for (let i = at; i < Math.min(expected.length, received.length); i++) if (expected[i] !== received[i]) differing++
    problems.push(`${flow.name}: first difference at byte ${at} of ${expected.length} (${differing} bytes differ); ` +
      whoseBytes(flow, received, at, sent))
  }
  for (const connection of connections) {
    for (const problem of connection.problems) problems.push(`${connection.name}: ${problem}`)
    if (connection.closed !== '') problems.push(`${connection.name}: ${connection.closed} before the end`)
  }
  return problems
}

test('bytes stay in their own connection: 24 bridges, slow and fast, binary and text, both ways', { timeout: 30000 }, async (t) => {
  t.diagnostic(`seed ${SEED} (set INTEGRITY_SEED to repeat it)`)
  const servers: Record<string, TcpServer> = { '/binary': await startTcp(), '/chat': await startTcp(), '/text': await startTcp() }
  const gateway = await startGateway({
    routes: {
      '/binary': { upstream: servers['/binary'].address },
      '/chat': { upstream: servers['/chat'].address },
      '/text': { upstream: servers['/text'].address, frame: 'text' }
    }
  })
  const connections: Connection[] = []
  let chatting = true
  t.after(async () => {
    chatting = false
    for (const { ws } of connections) ws.terminate()
    await gateway.app.close()
    for (const server of Object.values(servers)) await server.close()
  })

  // Opened one at a time, so that the upstream socket a server accepts next is this client's.
  for (const plan of PLANS) {
    for (let n = 0; n < plan.count; n++) {
      const route = plan.text ? '/text' : plan.kind === 'chat' ? '/chat' : '/binary'
      const accepted = servers[route].nextSocket()
      const ws = await openClient(`${gateway.url}${route}`, undefined, {
        skipUTF8Validation: true, // each text message is checked below, so that a bad one is reported, not refused
        // Chatters mask with zeros, so that their frames, if they turn up in another stream, can be recognised.
        ...(plan.kind === 'chat' ? { generateMask: (mask: Buffer) => { mask.fill(0) } } : {})
      })
      const upstream = await accepted
      const name = `connection ${connections.length} (${plan.kind}${plan.text ? ' text' : ''}${plan.slow ? ' slow' : ''})`
      const ended = (): boolean => connection.closed !== ''
      const connection: Connection = {
        name, plan, ws, upstream, closed: '', problems: [], up: new Flow(name, 'client->upstream', ended), down: new Flow(name, 'upstream->client', ended)
      }
      ws.on('error', (err) => { connection.closed ||= `client error ${err.message}` })
      ws.on('close', (code: number, reason: Buffer) => { connection.closed ||= `client closed with ${code} ${reason.toString()}` })
      upstream.on('close', () => { connection.closed ||= 'upstream socket closed' })
      ws.on('message', (data: Buffer, isBinary: boolean) => {
        // On a text route every message is text and whole characters; on a binary route every message is binary.
        const wrong = isBinary === plan.text ? `a ${isBinary ? 'binary' : 'text'} message` : !isBinary && !isUtf8(data) ? 'a text message that is not UTF-8' : ''
        if (wrong !== '' && connection.problems.length === 0) connection.problems.push(`${wrong} at byte ${connection.down.receivedBytes}`)
        connection.down.receive(data)
      })
      upstream.on('data', (chunk: Buffer) => {
        connection.up.receive(chunk)
        if (plan.kind === 'chat') {
          // Echo: what comes back is checked against what the upstream sent, so each direction is checked alone.
          connection.down.send(chunk)
          upstream.write(chunk)
        }
      })
      connections.push(connection)
    }
  }

  // Every connection's content is made before any of it moves, so that making it does not stall the traffic.
  const generators = connections.map((_, id) => generator(SEED, id))
  const contents = connections.map(({ plan }, id) => plan.kind === 'chat'
    ? Buffer.alloc(0)
    : plan.text ? Buffer.from(randomText(generators[id], plan.bytes)) : randomBytes(generators[id], plan.bytes))
  const started = Date.now()
  const deadline = started + TRANSFERS_MS

  // The chatters talk all along; the bulk transfers take turns, so that while a slow reader's writes are
  // queued, nothing else large is read. A flow that comes up short is reported below, not here.
  const chats = connections.map((connection, id) => connection.plan.kind === 'chat' ? chat(connection, generators[id], () => !chatting) : null)
  for (const [id, connection] of connections.entries()) {
    if (connection.plan.kind !== 'chat') await transfer(connection, contents[id], generators[id], deadline).catch(() => {})
  }
  chatting = false
  await Promise.all(chats)
  const flows = connections.flatMap(connection => [connection.up, connection.down])
  await waitFor(() => flows.every(flow => flow.settled()), 3000).catch(() => {})

  const total = flows.reduce((sum, flow) => sum + flow.sentBytes, 0)
  t.diagnostic(`${(total / MB).toFixed(1)} MB in ${flows.length} flows, ${((Date.now() - started) / 1000).toFixed(1)} s`)
  const problems = findProblems(connections)
  assert.equal(problems.length, 0, `seed ${SEED}: ${problems.length} problems:\n${problems.slice(0, 12).join('\n')}`)
})
