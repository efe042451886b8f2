import { test } from 'node:test'
import assert from 'node:assert/strict'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { startGateway, startTcp, waitFor } from './helpers'
import { PING, PONG, frame, openRaw } from './raw-client'
import { ClientFrameReader } from '../lib/frames'

setFlagsFromString('--expose-gc')
const collect = runInNewContext('gc') as () => void
const MB = 1024 * 1024

/** Collects garbage; V8 frees array buffers' memory in a sweep after the collection, so it waits for it. */
async function gc (): Promise<void> {
  collect()
  await new Promise(resolve => setTimeout(resolve, 100))
  collect()
}

test('a text message held open across reads keeps none of those reads alive', { timeout: 20000 }, async (t) => {
  let received = 0
  const sink = await startTcp(socket => socket.on('data', (chunk: Buffer) => { received += chunk.length }))
  const gateway = await startGateway({ routes: { '/sink': { upstream: sink.address } } })
  t.after(async () => { await gateway.app.close(); await sink.close() })
  const upstream = sink.nextSocket()
  const client = await openRaw(`${gateway.url}/sink`)
  await upstream

  // Each write is one byte of a text message that stays open, then ~62 KB of pongs (which ws ignores): each
  // of the gateway's reads carries a tiny payload in a large read.
  const padding = Buffer.concat(new Array(480).fill(frame(PONG, Buffer.alloc(125))))
  client.socket.write(frame(1, 'a', { fin: false }))
  await gc()
  const before = process.memoryUsage().arrayBuffers
  for (let i = 0; i < 300; i++) {
    client.socket.write(Buffer.concat([frame(0, 'b', { fin: false }), padding]))
    await new Promise(resolve => setTimeout(resolve, 2))
  }
  // ws answers a ping only once it has read everything before it.
  client.socket.write(frame(PING, 'done'))
  await waitFor(() => client.frames.some(f => f.opcode === PONG), 10000)
  await gc()
  const grown = process.memoryUsage().arrayBuffers - before
  t.diagnostic(`memory held after 300 reads of ~64 KB: ${(grown / MB).toFixed(2)} MB`)
  assert.ok(grown < 4 * MB, `${(grown / MB).toFixed(1)} MB held for 301 bytes of an open text message`)
  await waitFor(() => received === 301)
})

test('what the reader hands on keeps at most about twice its size alive, however sparse the read', () => {
  // A 64 KiB read of 1-byte frames carries 9,362 payload bytes: queued for an upstream, they must not hold
  // the whole read's worth of memory.
  const read = Buffer.concat(new Array(9362).fill(frame(2, 'x')))
  const handed: Buffer[] = []
  const reader = new ClientFrameReader({
    clientData: bytes => { handed.push(bytes) },
    clientControl: () => true,
    clientFault: (code, reason) => { throw new Error(`${code} ${reason}`) }
  }, { maxPayload: 0, maxFragments: 0 })
  reader.push(read, read.length)
  assert.equal(handed.reduce((sum, bytes) => sum + bytes.length, 0), 9362)
  for (const bytes of handed) assert.ok(bytes.buffer.byteLength <= 2 * bytes.length, `${bytes.length} bytes keep ${bytes.buffer.byteLength} alive`)
})
