'use strict'

// The systems under comparison; one with `scenarios` runs only those. Each start() resolves to
//   { kind: 'ws' | 'tcp', url or urls, protocol, pids, stop(), gc?(), noMemory? }
// where url is the ws:// base the client appends '/echo', '/source' or '/sink' to (or urls names one per
// service), or, for kind 'tcp', the client uses the upstream ports directly. pids are the processes whose
// CPU and memory are measured.
const { spawn, spawnSync, fork } = require('node:child_process')
const { mkdirSync, writeFileSync } = require('node:fs')
const net = require('node:net')
const { join } = require('node:path')

const WORK = join(__dirname, '.work')

function which (command) {
  const found = spawnSync('sh', ['-c', `command -v ${command} || ls /usr/sbin/${command} 2>/dev/null`], { encoding: 'utf8' })
  return found.stdout.trim().split('\n')[0] || null
}

async function freePort () {
  const server = net.createServer()
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
  const port = server.address().port
  await new Promise(resolve => server.close(resolve))
  return port
}

/** Resolves once something accepts on the port; gives up after `timeout` ms. */
async function listening (port, child, timeout = 10000) {
  const deadline = Date.now() + timeout
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${child.spawnfile} exited with ${child.exitCode}`)
    const ok = await new Promise(resolve => {
      const socket = net.connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true) })
      socket.on('error', () => resolve(false))
    })
    if (ok) return
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  throw new Error(`nothing listening on ${port} after ${timeout} ms`)
}

function stopper (child) {
  return () => new Promise(resolve => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    const timer = setTimeout(() => child.kill('SIGKILL'), 3000)
    child.once('exit', () => { clearTimeout(timer); resolve() })
    child.kill('SIGTERM')
  })
}

/** Starts the upstream servers' process; resolves to its ports and a way to read the sink's count. */
async function startServers () {
  const child = fork(join(__dirname, 'servers.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const ports = await new Promise(resolve => child.once('message', resolve))
  return {
    ports,
    pid: child.pid,
    sinkBytes: () => new Promise(resolve => {
      child.once('message', message => resolve(message.sinkBytes))
      child.send('sinkBytes')
    }),
    stop: stopper(child)
  }
}

/** fastify-wstunnel as built in `module` (default: this checkout's dist). */
function gatewaySystem (module) {
  return {
    missing: () => null,
    async start (ports) {
      const child = fork(join(__dirname, 'gateway.js'), [JSON.stringify(ports), ...(module ? [module] : [])], {
        // BENCH_PROFILE=1 writes a CPU profile of the gateway to bench/.work when it stops.
        execArgv: ['--expose-gc', ...(process.env.BENCH_PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${WORK}`] : [])],
        stdio: ['ignore', 'inherit', 'inherit', 'ipc']
      })
      const { port } = await new Promise(resolve => child.once('message', resolve))
      return {
        kind: 'ws',
        url: `ws://127.0.0.1:${port}`,
        protocol: undefined,
        pids: [child.pid],
        gc: () => new Promise(resolve => {
          child.once('message', resolve)
          child.send('gc')
        }),
        stop: stopper(child)
      }
    }
  }
}

/** A bridge script of bench/ in a Node process of its own, in the given scenarios only. */
function nodeBridge (file, scenarios) {
  return {
    missing: () => null,
    scenarios,
    async start (ports) {
      const child = fork(join(__dirname, file), [JSON.stringify(ports)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
      const { port } = await new Promise(resolve => child.once('message', resolve))
      return { kind: 'ws', url: `ws://127.0.0.1:${port}`, protocol: undefined, pids: [child.pid], stop: stopper(child) }
    }
  }
}

const systems = {
  'fastify-wstunnel': gatewaySystem(),
  'direct TCP': {
    missing: () => null,
    async start () {
      return { kind: 'tcp', pids: [], noMemory: 'no gateway', stop: async () => {} }
    }
  },

  'lighttpd mod_wstunnel': {
    missing: () => which('lighttpd') === null ? 'lighttpd is not installed (apt-get install lighttpd)' : null,
    async start (ports) {
      mkdirSync(WORK, { recursive: true })
      const port = await freePort()
      const conf = join(WORK, `lighttpd-${port}.conf`)
      const route = (path, upstream) =>
        `$HTTP["url"] == "${path}" { wstunnel.server = ( "" => (( "host" => "127.0.0.1", "port" => ${upstream} )) ) }`
      writeFileSync(conf, [
        `server.document-root = "${WORK}"`,
        'server.bind = "127.0.0.1"',
        `server.port = ${port}`,
        'server.modules = ( "mod_wstunnel" )',
        `server.errorlog = "${join(WORK, `lighttpd-${port}.log`)}"`,
        'server.max-fds = 16384',
        'server.max-connections = 8000',
        'server.listen-backlog = 4096',
        'server.max-read-idle = 600',
        'server.max-write-idle = 600',
        'server.stream-request-body = 2',
        'server.stream-response-body = 2',
        'wstunnel.frame-type = "binary"',
        route('/echo', ports.echo),
        route('/source', ports.source),
        route('/sink', ports.sink),
        ''
      ].join('\n'))
      const child = spawn(which('lighttpd'), ['-D', '-f', conf], { stdio: ['ignore', 'inherit', 'inherit'] })
      await listening(port, child)
      // mod_wstunnel answers Sec-WebSocket-Protocol: binary even when none is asked, so the client offers it.
      return { kind: 'ws', url: `ws://127.0.0.1:${port}`, protocol: 'binary', pids: [child.pid], stop: stopper(child) }
    }
  },

  // Handshakes only: what Node's own HTTP server and two sockets cost, with nothing of Fastify or ws.
  'minimal Node bridge': nodeBridge('floor.js', ['handshake']),
  // The ten-line ws + net bridge. Not in the throughput scenarios: without backpressure it queues whatever
  // the faster side sends, without bound.
  'ws+net bridge': nodeBridge('ws-bridge.js', ['large', 'echo']),

  websockify: {
    missing: () => which('websockify') === null ? 'websockify is not installed (apt-get install websockify)' : null,
    async start (ports) {
      // websockify has one target per listener: three listeners, and the client picks one per service.
      const children = []
      const urls = {}
      for (const service of ['echo', 'source', 'sink']) {
        const port = await freePort()
        const child = spawn(which('websockify'), ['--log-file=/dev/null', `127.0.0.1:${port}`, `127.0.0.1:${ports[service]}`], { stdio: 'ignore' })
        children.push(child)
        await listening(port, child)
        urls[service] = `ws://127.0.0.1:${port}`
      }
      return {
        kind: 'ws',
        urls, // one per service
        protocol: 'binary',
        pids: children.map(child => child.pid),
        // websockify forks a process per connection; 5,000 of them would measure fork, not a bridge.
        noMemory: 'forks a process per connection',
        stop: () => Promise.all(children.map(child => stopper(child)()))
      }
    }
  }
}

// BENCH_COMPARE=/path/to/a/checkout (built) adds that version as a system, to measure a change A B A B.
if (process.env.BENCH_COMPARE) systems['fastify-wstunnel (compare)'] = gatewaySystem(process.env.BENCH_COMPARE)

module.exports = { systems, startServers, which }
