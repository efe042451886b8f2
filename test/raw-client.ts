import assert from 'node:assert/strict'
import { once } from 'node:events'
import { connect, type Socket } from 'node:net'
import { randomBytes } from 'node:crypto'
import { waitFor } from './helpers'

// A raw RFC 6455 client over TCP, so tests can cut frames anywhere and send what a well-behaved client
// library never would.

export const PING = 0x9
export const CLOSE = 0x8
export const PONG = 0xa

/** One client frame: masked unless `masked` is false; `rsv` is the three RSV bits (0-7). */
export function frame (opcode: number, payload: Buffer | string, { fin = true, masked = true, rsv = 0 } = {}): Buffer {
  const data = Buffer.from(payload)
  const length = data.length
  const extra = length < 126 ? 0 : length < 0x10000 ? 2 : 8
  const header = Buffer.alloc(2 + extra + (masked ? 4 : 0))
  header[0] = (fin ? 0x80 : 0) | (rsv << 4) | opcode
  header[1] = (masked ? 0x80 : 0) | (extra === 0 ? length : extra === 2 ? 126 : 127)
  if (extra === 2) header.writeUInt16BE(length, 2)
  if (extra === 8) header.writeBigUInt64BE(BigInt(length), 2)
  if (!masked) return Buffer.concat([header, data])
  const key = randomBytes(4)
  key.copy(header, 2 + extra)
  const body = Buffer.alloc(length)
  for (let i = 0; i < length; i++) body[i] = data[i] ^ key[i & 3]
  return Buffer.concat([header, body])
}

/** A server frame the client received. */
export interface ServerFrame { opcode: number, payload: Buffer }

/** A raw WebSocket client: the handshake done, the server's frames parsed as they come. */
export interface RawClient { socket: Socket, frames: ServerFrame[], ended: boolean }

export async function openRaw (url: string, { allowHalfOpen = false } = {}): Promise<RawClient> {
  const { hostname, port, pathname } = new URL(url)
  const socket = connect({ port: Number(port), host: hostname, allowHalfOpen })
  socket.setNoDelay(true)
  await once(socket, 'connect')
  socket.write(`GET ${pathname} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
    `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`)
  const client: RawClient = { socket, frames: [], ended: false }
  let buffered = Buffer.alloc(0)
  let upgraded = false
  socket.on('data', (chunk: Buffer) => {
    buffered = Buffer.concat([buffered, chunk])
    if (!upgraded) {
      const end = buffered.indexOf('\r\n\r\n')
      if (end < 0) return
      assert.match(buffered.subarray(0, end).toString(), /^HTTP\/1.1 101 /)
      upgraded = true
      buffered = buffered.subarray(end + 4)
    }
    while (buffered.length >= 2) {
      let length = buffered[1] & 0x7f
      let offset = 2
      if (length === 126) { length = buffered.readUInt16BE(2); offset = 4 }
      if (length === 127) { length = Number(buffered.readBigUInt64BE(2)); offset = 10 }
      if (buffered.length < offset + length) return
      client.frames.push({ opcode: buffered[0] & 0x0f, payload: buffered.subarray(offset, offset + length) })
      buffered = buffered.subarray(offset + length)
    }
  })
  // Ended: the gateway sent its FIN (a half-open client keeps its own side open) or the socket closed.
  socket.on('end', () => { client.ended = true })
  socket.on('close', () => { client.ended = true })
  await waitFor(() => upgraded)
  return client
}

/** Writes `bytes` cut at `cuts`, pausing between the pieces so that the gateway reads them apart. */
export async function writeCut (socket: Socket, bytes: Buffer, cuts: number[]): Promise<void> {
  let from = 0
  for (const cut of [...cuts, bytes.length]) {
    socket.write(bytes.subarray(from, cut))
    from = cut
    await new Promise(resolve => setTimeout(resolve, 3))
  }
}

/** Resolves with the close frame's code and reason once the gateway has sent one. */
export async function closeFrame (client: RawClient): Promise<{ code: number, reason: string }> {
  await waitFor(() => client.frames.some(f => f.opcode === CLOSE))
  const { payload } = client.frames.find(f => f.opcode === CLOSE) as ServerFrame
  return { code: payload.readUInt16BE(0), reason: payload.subarray(2).toString() }
}
