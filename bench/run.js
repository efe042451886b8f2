'use strict'

// `npm run bench`: fastify-wstunnel against direct TCP, lighttpd's mod_wstunnel, websockify and a ten-line
// ws + net bridge, on one machine in one run, interleaved round by round. Writes bench/RESULTS.md.
//   node --expose-gc bench/run.js [scenario ...]     BENCH_ROUNDS=3 BENCH_SYSTEMS='a,b' BENCH_WINDOW=2500
const { spawnSync } = require('node:child_process')
const { mkdirSync, readFileSync, writeFileSync } = require('node:fs')
const os = require('node:os')
const { join } = require('node:path')
const { systems, startServers, which } = require('./systems')
const load = require('./load')

const ROUNDS = Math.max(3, Number(process.env.BENCH_ROUNDS ?? 3))
const US = 'fastify-wstunnel'
const LIGHTTPD = 'lighttpd mod_wstunnel'
const DIRECT = 'direct TCP'
const WS_BRIDGE = 'ws+net bridge'
const SETTLE = 1000

// Handshakes go last: they leave tens of thousands of loopback connections in TIME_WAIT, which slows
// every later connect for a minute.
const scenarios = [
  { id: 'down', title: 'Throughput upstream → client, one connection, 64 KiB chunks', unit: 'MB/s', run: load.throughputDown, cpu: 'cpuPerGB', higher: true },
  { id: 'up', title: 'Throughput client → upstream, one connection, 64 KiB messages', unit: 'MB/s', run: load.throughputUp, cpu: 'cpuPerGB', higher: true },
  { id: 'echo', title: 'Echo message rate, 100 connections × 16 messages of 64 B in flight', unit: 'msg/s', run: load.echoRate, cpu: 'cpuPerMillion', higher: true },
  { id: 'latency', title: 'Round-trip latency, sequential 64 B messages, one connection', unit: 'µs p50', run: load.latency, together: true, extra: 'p99', higher: false },
  { id: 'large', title: 'Large-message round trip, sequential 1 MiB messages echoed whole, one connection', unit: 'ms p50', run: load.largeRoundTrip, extra: 'p99', extraUnit: 'ms', cpu: 'cpuPerRoundTrip', higher: false },
  { id: 'memory', title: 'Gateway memory per idle bridged connection, 5,000 connections', unit: 'KB/conn', run: load.memoryPerConnection, fresh: true, higher: false },
  { id: 'handshake', title: 'Handshake rate: open, one 64 B echo, close; 32 concurrent clients', unit: 'conn/s', run: load.handshakeRate, cpu: 'cpuPerConnection', higher: true, warmupRound: true }
]

const CPU_UNITS = { cpuPerGB: 'CPU s per GB', cpuPerMillion: 'CPU s per million msgs', cpuPerConnection: 'CPU µs per connection', cpuPerRoundTrip: 'CPU ms per round trip' }

const median = values => {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}
const fmt = value => value === null || value === undefined || Number.isNaN(value)
  ? '—'
  : Math.abs(value) >= 100 ? Math.round(value).toLocaleString('en-US') : value.toFixed(value >= 10 ? 1 : 2)

async function main () {
  const wanted = process.argv.slice(2)
  const chosen = wanted.length > 0 ? scenarios.filter(s => wanted.includes(s.id)) : scenarios
  const onlySystems = process.env.BENCH_SYSTEMS ? process.env.BENCH_SYSTEMS.split(',') : null
  const names = Object.keys(systems).filter(name => onlySystems === null || onlySystems.includes(name))
  const skipped = {}
  for (const name of names) {
    const missing = systems[name].missing()
    if (missing !== null) {
      skipped[name] = missing
      console.log(`skipping ${name}: ${missing}`)
    }
  }
  const present = names.filter(name => !(name in skipped))

  const servers = await startServers()
  const running = {}
  for (const name of present) running[name] = await systems[name].start(servers.ports)
  const results = {} // scenario id → system → [result per round]

  try {
    for (const scenario of chosen) {
      results[scenario.id] = {}
      if (scenario.warmupRound) {
        // One pass per system before the measured rounds: a process's first thousands of handshakes run
        // code V8 has not optimised yet, and whichever system went first paid for it.
        for (const name of present.filter(name => runsIn(name, scenario))) {
          await scenario.run(running[name], servers).catch(() => {})
          await new Promise(resolve => setTimeout(resolve, SETTLE))
        }
      }
      for (let round = 0; round < ROUNDS; round++) {
        // Interleaved, and the order turns each round so no system always goes first.
        const order = present.map((_, i) => present[(i + round) % present.length])
          .filter(name => runsIn(name, scenario))
        if (scenario.together) {
          // All systems in one pass, taking turns within it.
          let byName
          try {
            byName = await scenario.run(Object.fromEntries(order.map(name => [name, running[name]])), servers)
          } catch (err) {
            byName = Object.fromEntries(order.map(name => [name, { error: err.message }]))
          }
          for (const name of order) {
            const result = byName[name]
            ;(results[scenario.id][name] ??= []).push(result)
            logResult(scenario, round, name, result)
          }
          await new Promise(resolve => setTimeout(resolve, SETTLE))
          continue
        }
        for (const name of order) {
          let system = running[name]
          if (scenario.fresh) {
            if (system.noMemory) continue
            system = await systems[name].start(servers.ports)
          }
          let result
          try {
            result = await scenario.run(system, servers)
          } catch (err) {
            result = { error: err.message }
          } finally {
            if (scenario.fresh) await system.stop()
          }
          ;(results[scenario.id][name] ??= []).push(result)
          await new Promise(resolve => setTimeout(resolve, SETTLE)) // let closing connections and processes finish
          logResult(scenario, round, name, result)
        }
      }
    }
  } finally {
    for (const name of present) await running[name].stop()
    await servers.stop()
  }

  mkdirSync(join(__dirname, '.work'), { recursive: true })
  writeFileSync(join(__dirname, '.work', 'results.json'), JSON.stringify({ chosen: chosen.map(c => c.id), present, results, skipped }))
  const report = render(chosen, present, results, skipped)
  console.log('\n' + report)
  if (wanted.length === 0 && !onlySystems) writeFileSync(join(__dirname, 'RESULTS.md'), report)
}

function render (chosen, present, results, skipped) {
  const lines = []
  const lighttpd = spawnSync(which('lighttpd') ?? 'false', ['-v'], { encoding: 'utf8' }).stdout?.trim().split('\n')[0]
  const websockify = spawnSync('sh', ['-c', 'dpkg-query -W websockify 2>/dev/null'], { encoding: 'utf8' }).stdout.trim().split('\t')[1]
  lines.push('# Benchmark results', '')
  lines.push(`${new Date().toISOString().slice(0, 10)} on ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} cores, ` +
    `${Math.round(os.totalmem() / 2 ** 30)} GiB, ${os.type()} ${os.release()}; Node ${process.version}` +
    (lighttpd ? `; ${lighttpd}` : '') + (websockify ? `; websockify ${websockify}` : '') + '.', '')
  lines.push(`Medians over ${ROUNDS} interleaved rounds (min–max in brackets); everything on 127.0.0.1. ` +
    'CPU is the gateway process\'s user + system time from /proc over the measured window.', '')
  for (const [name, reason] of Object.entries(skipped)) lines.push(`- ${name} skipped: ${reason}`)
  if (Object.keys(skipped).length > 0) lines.push('')

  const summaries = {}
  for (const scenario of chosen) {
    const bySystem = results[scenario.id] ?? {}
    const summary = summaries[scenario.id] = {}
    for (const name of present) {
      const runs = (bySystem[name] ?? []).filter(run => run.error === undefined)
      if (runs.length === 0) continue
      const values = runs.map(run => run.value)
      summary[name] = {
        median: median(values),
        min: Math.min(...values),
        max: Math.max(...values),
        extra: scenario.extra ? median(runs.map(run => run[scenario.extra])) : undefined,
        cpu: scenario.cpu && runs[0][scenario.cpu] !== null ? median(runs.map(run => run[scenario.cpu])) : undefined,
        errors: (bySystem[name] ?? []).length - runs.length
      }
    }
    lines.push(`## ${scenario.title}`, '')
    const header = ['system', `${scenario.unit} (median)`, 'min–max']
    if (scenario.extra) header.push(`${scenario.extra} ${scenario.extraUnit ?? 'µs'}`)
    header.push('× lighttpd', '× direct TCP')
    if (scenario.cpu) header.push(CPU_UNITS[scenario.cpu])
    lines.push(`| ${header.join(' | ')} |`, `|${header.map(() => ' --- ').join('|')}|`)
    for (const name of present.filter(name => runsIn(name, scenario))) {
      const s = summary[name]
      if (s === undefined) {
        const reason = bySystem[name]?.[0]?.error ?? (scenario.fresh ? notRunReason(name) : 'no result')
        lines.push(`| ${name} | — (${reason}) |${' |'.repeat(header.length - 2)}`)
        continue
      }
      const ratio = other => summary[other] ? s.median / summary[other].median : null
      const row = [name + (s.errors > 0 ? ` (${s.errors} failed)` : ''), fmt(s.median), `${fmt(s.min)}–${fmt(s.max)}`]
      if (scenario.extra) row.push(fmt(s.extra))
      row.push(ratioText(ratio(LIGHTTPD)), ratioText(ratio(DIRECT)))
      if (scenario.cpu) row.push(fmt(s.cpu))
      lines.push(`| ${row.join(' | ')} |`)
    }
    lines.push('')
  }
  lines.push(...renderTargets(summaries))
  return lines.join('\n')

  function notRunReason (name) {
    return name === DIRECT ? 'no gateway' : name === 'websockify' ? 'forks a process per connection' : 'not run'
  }
}

// The issue's targets, checked on the medians of this run.
const TARGETS = [
  { id: 'echo', text: 'echo message rate ≥ 1.0× lighttpd', ours: s => s[US].median, reference: s => s[LIGHTTPD].median, met: (a, b) => a >= b },
  { id: 'down', text: 'throughput upstream → client ≥ 1.5× lighttpd', ours: s => s[US].median, reference: s => 1.5 * s[LIGHTTPD].median, met: (a, b) => a >= b },
  { id: 'down', text: 'throughput upstream → client ≥ 0.4× direct TCP', ours: s => s[US].median, reference: s => 0.4 * s[DIRECT].median, met: (a, b) => a >= b },
  { id: 'up', text: 'throughput client → upstream ≥ 1.5× lighttpd', ours: s => s[US].median, reference: s => 1.5 * s[LIGHTTPD].median, met: (a, b) => a >= b },
  { id: 'up', text: 'throughput client → upstream ≥ 0.4× direct TCP', ours: s => s[US].median, reference: s => 0.4 * s[DIRECT].median, met: (a, b) => a >= b },
  { id: 'latency', text: 'latency p50 ≤ lighttpd (µs)', ours: s => s[US].median, reference: s => s[LIGHTTPD].median, met: (a, b) => a <= b },
  { id: 'latency', text: 'latency p99 ≤ lighttpd (µs)', ours: s => s[US].extra, reference: s => s[LIGHTTPD].extra, met: (a, b) => a <= b },
  { id: 'large', text: '1 MiB round trip p50 ≤ ws+net bridge (ms)', ours: s => s[US].median, reference: s => s[WS_BRIDGE].median, met: (a, b) => a <= b },
  { id: 'handshake', text: 'handshake rate ≥ lighttpd', ours: s => s[US].median, reference: s => s[LIGHTTPD].median, met: (a, b) => a >= b },
  { id: 'memory', text: 'memory per idle connection ≤ 12 KB', ours: s => s[US].median, reference: () => 12, met: (a, b) => a <= b }
]

function renderTargets (summaries) {
  const lines = ['## Targets', '', '| target | fastify-wstunnel | bound | met |', '| --- | --- | --- | --- |']
  for (const target of TARGETS) {
    let ours = null
    let bound = null
    try {
      ours = target.ours(summaries[target.id])
      bound = target.reference(summaries[target.id])
    } catch {} // a system or scenario that did not run
    const met = ours === null || bound === null || ours === undefined || bound === undefined ? 'not measured' : target.met(ours, bound) ? 'yes' : '**no**'
    lines.push(`| ${target.text} | ${fmt(ours)} | ${fmt(bound)} | ${met} |`)
  }
  lines.push('')
  lines.push('Where the gaps are (2026-11-25; /proc times over 3 s windows, `perf record`, `strace -c`, `nstat`):', '',
    '- Echo: the rates are at parity because the load client, one Node process, is the limit for both, so a ' +
    'median a little above or below 1.0× is a toss-up. Per message the gateway spends about 1.3 CPU µs (0.34 user, ' +
    '0.77 kernel) against lighttpd\'s 1.12 (0.10 user, 0.62 kernel), ' +
    'with the same read and write system calls per message. lighttpd leaves Nagle on (no TCP_NODELAY on either socket) ' +
    'and sends about 20% fewer TCP segments per message, but the gateway with `noDelay` off measured the same CPU per ' +
    'message, so that is not the gap. What user time is left is Node\'s per-read and per-write cost (the callback ' +
    'into JavaScript, the write request and its completion), not JavaScript of ours or ws\'s.',
    '- Handshakes: about 270 CPU µs per connection against lighttpd\'s 90. `minimal Node bridge` (bench/floor.js: ' +
    'Node\'s HTTP server, the accept hash, the upstream connect and two sockets, with no Fastify, no ws and no checks) ' +
    'spends 170–210 µs and reaches 0.88–0.97× lighttpd\'s rate: no Node bridge reaches lighttpd\'s rate on this ' +
    'machine, where the load client needs about 385 µs of the same two cores per connection. The 80–100 µs between ' +
    'it and us is Fastify\'s routing and hooks, ws\'s upgrade and the bridge\'s setup. An unmeasured pass per ' +
    'system comes first: a process\'s first handshakes cost Node systems up to twice the CPU of later ones.',
    '- Latency: one round trip wakes three processes four times on two cores. With the systems taking turns ' +
    'in one pass, most rounds\' medians agree within a few µs; the gateway spends about 6.5 µs of user CPU ' +
    'per round trip against lighttpd\'s 2.3 (Node\'s cost of a read and a write, twice) and about 17 µs in the ' +
    'kernel against 15. p99 moves by a third from round to round for every system.',
    '',
    'Run-to-run spread on this shared 2-core machine is large (see min–max): compare the systems within one run only.', '')
  return lines
}

/** One line of progress: a system's result in one round. */
function logResult (scenario, round, name, result) {
  const details = ['p99', 'cpuPerGB', 'cpuPerMillion', 'cpuPerConnection', 'cpuPerRoundTrip', 'roundTrips', 'perRead', 'perWrite', 'failed']
    .filter(key => result[key] !== undefined && result[key] !== null).map(key => `${key} ${fmt(result[key])}`).join(', ')
  console.log(`${scenario.id} round ${round + 1} ${name}: ${result.error ?? fmt(result.value) + ' ' + scenario.unit}${details ? ` (${details})` : ''}`)
}

/** Whether the system takes part in the scenario. */
function runsIn (name, scenario) {
  return systems[name]?.scenarios?.includes(scenario.id) ?? true
}

const ratioText = ratio => ratio === null ? '—' : `${ratio.toFixed(2)}×`

if (process.argv[2] === '--render') {
  // Re-renders the last run's report from bench/.work/results.json, without running anything.
  const saved = JSON.parse(readFileSync(join(__dirname, '.work', 'results.json'), 'utf8'))
  const report = render(scenarios.filter(s => saved.chosen.includes(s.id)), saved.present, saved.results, saved.skipped)
  writeFileSync(join(__dirname, 'RESULTS.md'), report)
  console.log(report)
} else {
  main().catch(err => {
    console.error(err)
    process.exitCode = 1
  })
}
