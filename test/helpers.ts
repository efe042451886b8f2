import { once } from 'node:events'
import { spawn, type ChildProcess } from 'node:child_process'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { Writable } from 'node:stream'
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import WebSocket, { type ClientOptions } from 'ws'
import wstunnel, { type FastifyWstunnelOptions } from '../lib/index'

/** A real TCP server on 127.0.0.1 that remembers its sockets and counts connections. */
export interface TcpServer {
  port: number
  address: string
  server: Server
  sockets: Set<Socket>
  connections: number
  /** Resolves with the next socket the server accepts. */
  nextSocket (): Promise<Socket>
  close (): Promise<void>
}

export async function startTcp (onSocket: (socket: Socket) => void = () => {}): Promise<TcpServer> {
  const sockets = new Set<Socket>()
  const waiting: Array<(socket: Socket) => void> = []
  const server = createServer((socket) => {
    tcp.connections++
    sockets.add(socket)
    socket.on('error', () => {})
    socket.on('close', () => sockets.delete(socket))
    onSocket(socket)
    waiting.shift()?.(socket)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as { port: number }).port
  const tcp: TcpServer = {
    port,
    address: `127.0.0.1:${port}`,
    server,
    sockets,
    connections: 0,
    nextSocket: () => new Promise(resolve => waiting.push(resolve)),
    async close () {
      for (const socket of sockets) socket.destroy()
      await new Promise(resolve => server.close(resolve))
    }
  }
  return tcp
}

/** A port nothing listens on: bind one, note it, close it. */
export async function deadPort (): Promise<number> {
  const server = await startTcp()
  await server.close()
  return server.port
}

/** A listener that never accepts, with its one-slot backlog taken: connects to `port` hang (a black hole). */
export async function startStalledListener (): Promise<{ port: number, close: () => void }> {
  const listener = spawn('python3', ['-c', [
    'import socket, sys',
    's = socket.socket()',
    "s.bind(('127.0.0.1', 0))",
    's.listen(0)',
    'print(s.getsockname()[1], flush=True)',
    'sys.stdin.read()'
  ].join('\n')], { stdio: ['pipe', 'pipe', 'inherit'] })
  const [line] = await once(listener.stdout, 'data') as [Buffer]
  const port = Number(line.toString())
  const filler = connect(port, '127.0.0.1')
  filler.on('error', () => {})
  await once(filler, 'connect')
  return {
    port,
    close () {
      filler.destroy()
      listener.stdin.end()
    }
  }
}

/** Resolves with the address a started gateway process logs it listens at ('http://127.0.0.1:port'); rejects
 *  with what it printed if it ends first. Its output goes on being read, so it never blocks on a full pipe. */
export async function listeningAt (child: ChildProcess): Promise<string> {
  let output = ''
  for await (const chunk of child.stdout!) {
    output += String(chunk)
    const match = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output)
    if (match !== null) {
      child.stdout!.resume()
      return match[1]
    }
  }
  throw new Error(`the gateway did not start: ${output}`)
}

/** A command started in its own process group: its log lines (JSON parsed, other lines as { msg }), all it
 *  printed, and its exit. */
export interface Running {
  child: ChildProcess
  lines: Array<Record<string, unknown>>
  output: () => string
  exited: Promise<{ code: number | null, signal: string | null }>
}

/** Starts a command in its own process group, collecting its output and its log lines. */
export function runGroup (command: string, args: string[]): Running {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  const lines: Array<Record<string, unknown>> = []
  let text = ''
  let partial = ''
  child.stdout!.on('data', (chunk: Buffer) => {
    text += String(chunk)
    const parts = (partial + String(chunk)).split('\n')
    partial = parts.pop()!
    for (const part of parts) {
      try {
        lines.push(JSON.parse(part))
      } catch {
        lines.push({ msg: part })
      }
    }
  })
  child.stderr!.on('data', (chunk: Buffer) => { text += String(chunk) })
  const exited = once(child, 'exit').then(([code, signal]) => ({ code, signal } as { code: number | null, signal: string | null }))
  return { child, lines, output: () => text, exited }
}

/** Kills a started command's process group (it and every process it started), and waits for it to exit. */
export async function killGroup (running: Running): Promise<void> {
  try {
    process.kill(-running.child.pid!, 'SIGKILL')
  } catch {} // the whole group has exited already
  await running.exited
}

/** An echo server: every byte comes back. */
export function startEcho (): Promise<TcpServer> {
  return startTcp(socket => socket.pipe(socket))
}

/** Log lines written by Fastify's logger, parsed. */
export class LogCapture extends Writable {
  lines: Array<Record<string, unknown>> = []
  _write (chunk: Buffer, _encoding: string, callback: () => void): void {
    for (const line of chunk.toString().split('\n')) if (line !== '') this.lines.push(JSON.parse(line))
    callback()
  }

  find (msg: string): Array<Record<string, unknown>> {
    return this.lines.filter(line => line.msg === msg)
  }
}

export interface Gateway {
  app: FastifyInstance
  url: string
  logs: LogCapture
}

/** Starts Fastify with the plugin on 127.0.0.1 (or `listen.host`) and an ephemeral port. */
export async function startGateway (
  options: FastifyWstunnelOptions,
  setup?: (app: FastifyInstance) => void | Promise<void>,
  listen: { host?: string, fastify?: FastifyServerOptions } = {}
): Promise<Gateway> {
  const logs = new LogCapture()
  const app = Fastify({ ...listen.fastify, logger: { level: 'info', stream: logs } })
  if (setup !== undefined) await setup(app)
  await app.register(wstunnel, options)
  const host = listen.host ?? '127.0.0.1'
  await app.listen({ port: 0, host })
  const { port } = app.server.address() as { port: number }
  return { app, url: `ws://${host.includes(':') ? `[${host}]` : host}:${port}`, logs }
}

/** A client whose messages are collected from the first one on, even those that arrive with the handshake. */
export type Client = WebSocket & { inbox: Array<{ data: Buffer, isBinary: boolean }> }

/** Opens a WebSocket and resolves once it is open; rejects with the HTTP status if the handshake is refused. */
export function openClient (url: string, protocols?: string | string[], options?: ClientOptions): Promise<Client> {
  return new Promise((resolve, reject) => {
    const ws = Object.assign(new WebSocket(url, protocols, options), { inbox: [] as Client['inbox'] })
    ws.on('message', (data: Buffer, isBinary: boolean) => ws.inbox.push({ data, isBinary }))
    ws.once('open', () => resolve(ws))
    ws.once('unexpected-response', (_request, response) => {
      let body = ''
      response.on('data', (chunk: Buffer) => { body += chunk.toString() })
      response.on('end', () => {
        ws.terminate()
        reject(Object.assign(new Error(`HTTP ${String(response.statusCode)}`), { statusCode: response.statusCode, body }))
      })
    })
    ws.once('error', reject)
  })
}

/** The text of every message the client has received so far. */
export function texts (ws: Client): string[] {
  return ws.inbox.map(message => message.data.toString())
}

/** Resolves with the client's close code and reason. */
export async function closed (ws: WebSocket): Promise<{ code: number, reason: string }> {
  if (ws.readyState === WebSocket.CLOSED) throw new Error('already closed')
  const [code, reason] = await once(ws, 'close') as [number, Buffer]
  return { code, reason: reason.toString() }
}

/** Resolves with everything the client has received once `bytes` have arrived, counting from its first message. */
export async function receiveBytes (ws: Client, bytes: number): Promise<Buffer> {
  const received = (): number => ws.inbox.reduce((sum, message) => sum + message.data.length, 0)
  await waitFor(() => received() >= bytes || ws.readyState === WebSocket.CLOSED, 20000)
  if (received() < bytes) throw new Error(`closed after ${received()} of ${bytes} bytes`)
  return Buffer.concat(ws.inbox.map(message => message.data))
}

/** Reads from a TCP socket until `bytes` have arrived. */
export function readBytes (socket: Socket, bytes: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let length = 0
    const onData = (chunk: Buffer): void => {
      chunks.push(chunk)
      length += chunk.length
      if (length >= bytes) {
        socket.removeListener('data', onData)
        resolve(Buffer.concat(chunks))
      }
    }
    socket.on('data', onData)
    socket.once('close', () => reject(new Error(`socket closed after ${length} of ${bytes} bytes`)))
  })
}

/** Resolves when `predicate` holds, polling every 10 ms; rejects after `timeout` ms. */
export async function waitFor (predicate: () => boolean, timeout = 3000): Promise<void> {
  const deadline = Date.now() + timeout
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('condition not met in time')
    await new Promise(resolve => setTimeout(resolve, 10))
  }
}
