'use strict'

// The load client and the scenarios. Every loop is bounded: by a time window, a count, or both.
const { readFileSync, readdirSync } = require('node:fs')
const net = require('node:net')
const WebSocket = require('ws')

const WARMUP = Number(process.env.BENCH_WARMUP ?? 500)
const WINDOW = Number(process.env.BENCH_WINDOW ?? 2500)
const MESSAGE = Buffer.alloc(64, 'm')
const BIG = Buffer.alloc(64 * 1024, 'b')
const LARGE = Buffer.alloc(1024 * 1024, 'l')
const TICKS = 100 // USER_HZ: /proc times are in 1/100 s

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

/** A connection to a service ('echo', 'source' or 'sink') of a system, as a byte stream either way. */
function connect (system, ports, service) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`connect to ${service} timed out`)), 10000)
    if (system.kind === 'tcp') {
      const socket = net.connect(ports[service], '127.0.0.1', () => {
        clearTimeout(timer)
        socket.setNoDelay(true)
        resolve({
          send: (data, done) => socket.write(data, done),
          batch: fn => { socket.cork(); fn(); socket.uncork() },
          buffered: () => socket.writableLength,
          onData: fn => socket.on('data', fn),
          close: () => new Promise(resolve => { socket.once('close', resolve); socket.end() }),
          destroy: () => socket.destroy()
        })
      })
      socket.on('error', err => { clearTimeout(timer); reject(err) })
      return
    }
    const url = system.urls ? system.urls[service] : `${system.url}/${service}`
    const ws = new WebSocket(url, system.protocol, { perMessageDeflate: false })
    ws.binaryType = 'nodebuffer'
    ws.once('open', () => {
      clearTimeout(timer)
      resolve({
        send: (data, done) => ws.send(data, { binary: true }, done),
        // Messages sent together go out in one write (ws keeps its socket as _socket).
        batch: fn => { ws._socket.cork(); fn(); ws._socket.uncork() },
        buffered: () => ws.bufferedAmount,
        onData: fn => ws.on('message', fn),
        close: () => new Promise(resolve => {
          if (ws.readyState === WebSocket.CLOSED) return resolve()
          ws.once('close', resolve)
          ws.close(1000)
        }),
        destroy: () => ws.terminate()
      })
    })
    ws.once('error', err => { clearTimeout(timer); reject(err) })
    ws.once('unexpected-response', (_request, response) => {
      clearTimeout(timer)
      reject(new Error(`HTTP ${response.statusCode} from ${url}`))
    })
  })
}

/** CPU seconds (user + system) of the processes and their descendants, reaped ones included. */
function cpuSeconds (pids) {
  let ticks = 0
  const visit = (pid, root) => {
    let stat
    try {
      stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    } catch {
      return
    }
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    ticks += Number(fields[11]) + Number(fields[12]) // utime, stime
    if (root) ticks += Number(fields[13]) + Number(fields[14]) // cutime, cstime: children already reaped
    for (const child of childrenOf(pid)) visit(child, false)
  }
  for (const pid of pids) visit(pid, true)
  return ticks / TICKS
}

/** Read and write system calls made by the processes and their live descendants: [reads, writes]. */
function syscalls (pids) {
  let reads = 0
  let writes = 0
  const visit = pid => {
    const io = readFileSafe(`/proc/${pid}/io`)
    reads += Number(/syscr: (\d+)/.exec(io)?.[1] ?? 0)
    writes += Number(/syscw: (\d+)/.exec(io)?.[1] ?? 0)
    for (const child of childrenOf(pid)) visit(child)
  }
  for (const pid of pids) visit(pid)
  return [reads, writes]
}

function childrenOf (pid) {
  return safeList(`/proc/${pid}/task`).flatMap(task => readFileSafe(`/proc/${pid}/task/${task}/children`).split(' ').filter(Boolean))
}

/** Resident memory of the processes and their descendants, in bytes. */
function rssBytes (pids) {
  let kb = 0
  const visit = pid => {
    const match = /VmRSS:\s+(\d+) kB/.exec(readFileSafe(`/proc/${pid}/status`))
    if (match !== null) kb += Number(match[1])
    for (const child of childrenOf(pid)) visit(child)
  }
  for (const pid of pids) visit(pid)
  return kb * 1024
}

function readFileSafe (path) {
  try {
    return readFileSync(path, 'utf8')
  } catch {
    return ''
  }
}

function safeList (path) {
  try {
    return readdirSync(path)
  } catch {
    return []
  }
}

/** Counts bytes over a window after a warm-up, with the system's CPU over the same window. */
async function measureWindow (system, read) {
  await sleep(WARMUP)
  const bytes0 = await read()
  const cpu0 = cpuSeconds(system.pids)
  const [reads0, writes0] = syscalls(system.pids)
  const t0 = process.hrtime.bigint()
  await sleep(WINDOW)
  const bytes1 = await read()
  const cpu1 = cpuSeconds(system.pids)
  const [reads1, writes1] = syscalls(system.pids)
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9
  return { bytes: bytes1 - bytes0, seconds, cpu: cpu1 - cpu0, reads: reads1 - reads0, writes: writes1 - writes0 }
}

/** Upstream → client: the source writes 64 KiB chunks; MB/s the client receives. */
async function throughputDown (system, servers) {
  const conn = await connect(system, servers.ports, 'source')
  let received = 0
  conn.onData(data => { received += data.length })
  const { bytes, seconds, cpu } = await measureWindow(system, async () => received)
  conn.destroy()
  return { value: bytes / seconds / 1e6, cpuPerGB: system.pids.length > 0 ? cpu / (bytes / 1e9) : null }
}

/** Client → upstream: 64 KiB messages as fast as the system takes them; MB/s the sink receives. */
async function throughputUp (system, servers) {
  const conn = await connect(system, servers.ports, 'sink')
  const state = { running: true }
  const pump = () => {
    // At most 1 MiB queued in the client; each write's callback refills.
    while (state.running && conn.buffered() < 1024 * 1024) conn.send(BIG, pump)
  }
  pump()
  const { bytes, seconds, cpu } = await measureWindow(system, servers.sinkBytes)
  state.running = false
  conn.destroy()
  return { value: bytes / seconds / 1e6, cpuPerGB: system.pids.length > 0 ? cpu / (bytes / 1e9) : null }
}

/** 100 connections, each keeping 16 messages of 64 B in flight; echoed messages per second,
 *  counted as echoed bytes / 64, since a stream bridge may re-chunk. */
async function echoRate (system, servers, { connections = 100, inFlight = 16 } = {}) {
  let echoed = 0
  let running = true
  const conns = await openMany(system, servers, connections, 50)
  for (const conn of conns) {
    let pending = 0
    // The client answers each echoed 64 B with a new message, batched per read so it is not the bottleneck.
    const refill = () => {
      while (pending >= MESSAGE.length) {
        pending -= MESSAGE.length
        if (running) conn.send(MESSAGE)
      }
    }
    conn.onData(data => {
      echoed += data.length
      pending += data.length
      if (pending >= 2 * MESSAGE.length) conn.batch(refill)
      else refill()
    })
    pending = inFlight * MESSAGE.length
    conn.batch(refill)
  }
  const { bytes, seconds, cpu, reads, writes } = await measureWindow(system, async () => echoed)
  running = false
  await Promise.all(conns.map(conn => conn.destroy()))
  const messages = bytes / MESSAGE.length
  const gateway = system.pids.length > 0
  return {
    value: messages / seconds,
    cpuPerMillion: gateway ? cpu / (messages / 1e6) : null,
    // How many messages each read and write system call of the gateway carries.
    perRead: gateway && reads > 0 ? messages / reads : null,
    perWrite: gateway && writes > 0 ? messages / writes : null
  }
}

/** Round trips of `message` through an echo connection: each resolves once `message.length` bytes are back,
 *  in however many messages; with `timeout`, one that is not back by then rejects. */
function echoRoundTrips (conn, message, timeout) {
  let pending = 0
  let wake = null
  conn.onData(data => {
    pending += data.length
    if (pending >= message.length && wake !== null) { pending -= message.length; const w = wake; wake = null; w() }
  })
  return () => new Promise((resolve, reject) => {
    const timer = timeout === undefined ? null : setTimeout(() => reject(new Error(`round trip not back after ${timeout} ms`)), timeout)
    wake = () => { if (timer !== null) clearTimeout(timer); resolve() }
    conn.send(message)
  })
}

/** The q-quantile of sorted samples. */
function quantile (samples, q) {
  return samples[Math.min(samples.length - 1, Math.floor(q * samples.length))]
}

/** Sequential round trips of 64 B, one connection per system, the systems taking turns in batches of
 *  `batch` round trips: where the scheduler puts the processes drifts within a run, and so it weighs on every
 *  system alike. Resolves to p50 and p99 in microseconds for each system, by name. */
async function latency (systems, servers, { count = 5000, warmup = 500, batch = 50 } = {}) {
  const probes = {}
  for (const [name, system] of Object.entries(systems)) {
    const conn = await connect(system, servers.ports, 'echo')
    probes[name] = { conn, roundTrip: echoRoundTrips(conn, MESSAGE), samples: [] }
  }
  const deadline = Date.now() + 10000 * Object.keys(probes).length
  for (let done = 0; done < warmup + count && Date.now() < deadline; done += batch) {
    for (const probe of Object.values(probes)) {
      for (let i = done; i < done + batch; i++) {
        const t0 = process.hrtime.bigint()
        await probe.roundTrip()
        if (i >= warmup) probe.samples.push(Number(process.hrtime.bigint() - t0) / 1000)
      }
    }
  }
  const results = {}
  for (const [name, { conn, samples }] of Object.entries(probes)) {
    conn.destroy()
    samples.sort((a, b) => a - b)
    results[name] = { value: quantile(samples, 0.5), p99: quantile(samples, 0.99), samples: samples.length }
  }
  return results
}

/** Sequential round trips of one 1 MiB message on one connection, as an MQTT publish reaching a subscriber:
 *  each waits until all 1 MiB is back, in however many messages. After a warm-up, up to `count` round trips
 *  within the window; resolves to p50 and p99 in ms, with the gateway's CPU ms per round trip. */
async function largeRoundTrip (system, servers, { count = 1000, timeout = 10000 } = {}) {
  const conn = await connect(system, servers.ports, 'echo')
  // A system that drops or truncates the message fails the round, not the run.
  const roundTrip = echoRoundTrips(conn, LARGE, timeout)
  const samples = []
  let cpu
  try {
    for (const warmEnd = Date.now() + WARMUP; Date.now() < warmEnd;) await roundTrip()
    const cpu0 = cpuSeconds(system.pids)
    for (const end = Date.now() + WINDOW; samples.length < count && Date.now() < end;) {
      const t0 = process.hrtime.bigint()
      await roundTrip()
      samples.push(Number(process.hrtime.bigint() - t0) / 1e6)
    }
    cpu = cpuSeconds(system.pids) - cpu0
  } finally {
    conn.destroy()
  }
  samples.sort((a, b) => a - b)
  return { value: quantile(samples, 0.5), p99: quantile(samples, 0.99), roundTrips: samples.length, cpuPerRoundTrip: system.pids.length > 0 ? cpu / samples.length * 1e3 : null }
}

/** 32 concurrent clients, each looping: open, one 64 B echo, close. Completed cycles per second. */
async function handshakeRate (system, servers, { concurrency = 32 } = {}) {
  let done = 0
  let failed = 0
  const state = { running: true }
  const cycle = async () => {
    const conn = await connect(system, servers.ports, 'echo')
    await new Promise(resolve => {
      let got = 0
      conn.onData(data => { got += data.length; if (got >= MESSAGE.length) resolve() })
      conn.send(MESSAGE)
    })
    await conn.close()
  }
  const worker = async () => {
    while (state.running) {
      try {
        await cycle()
        done++
      } catch {
        failed++
        await sleep(10)
      }
    }
  }
  const workers = Array.from({ length: concurrency }, worker)
  const { bytes, seconds, cpu } = await measureWindow(system, async () => done)
  state.running = false
  await Promise.race([Promise.all(workers), sleep(5000)])
  return { value: bytes / seconds, cpuPerConnection: system.pids.length > 0 && bytes > 0 ? cpu / bytes * 1e6 : null, failed }
}

/** Gateway memory per idle bridged connection: RSS (after a forced GC where there is one) with 5,000
 *  connections open, each having echoed once, minus RSS before they opened. Needs a fresh system. */
async function memoryPerConnection (system, servers, { connections = 5000 } = {}) {
  // Warm the code paths first, so what is measured is connections, not lazy initialisation.
  for (const conn of await openMany(system, servers, 50, 25)) await conn.close()
  await sleep(300)
  if (system.gc) await system.gc()
  const before = rssBytes(system.pids)
  const conns = await openMany(system, servers, connections, 100, true)
  await sleep(500)
  if (system.gc) await system.gc()
  const after = rssBytes(system.pids)
  await Promise.all(conns.map(conn => conn.destroy()))
  return { value: (after - before) / connections / 1024, rssMB: after / 1e6 }
}

/** Opens `count` echo connections, `parallel` at a time; with `echo`, each echoes one message first. */
async function openMany (system, servers, count, parallel, echo = false) {
  const conns = []
  let next = 0
  const opener = async () => {
    while (next < count) {
      next++
      const conn = await connect(system, servers.ports, 'echo')
      if (echo) {
        await new Promise(resolve => {
          let got = 0
          const onData = data => { got += data.length; if (got >= MESSAGE.length) resolve() }
          conn.onData(onData)
          conn.send(MESSAGE)
        })
      }
      conns.push(conn)
    }
  }
  await Promise.all(Array.from({ length: parallel }, opener))
  return conns
}

module.exports = { throughputDown, throughputUp, echoRate, latency, largeRoundTrip, handshakeRate, memoryPerConnection, cpuSeconds }
