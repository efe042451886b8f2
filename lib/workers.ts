import cluster, { type Worker } from 'node:cluster'
import { hostname } from 'node:os'

// A worker that dies is replaced, unless workers die this often: then the fault is not going away.
const CRASH_LIMIT = 5
const CRASH_WINDOW = 10000

/** Forks `count` workers, each running the gateway on the port they share, and keeps them running until
 *  SIGTERM or SIGINT, then stops them, killing those still running after `stopTimeout` ms. Exits the process:
 *  0 when every worker closed cleanly in time, else 1. */
export function runPrimary (count: number, stopTimeout: number): void {
  const workers = new Set<Worker>()
  const deaths: number[] = []
  let stopping = false
  let exitCode = 0

  function fork (): void {
    const worker = cluster.fork()
    workers.add(worker)
    // A worker gone while the primary answers its listen makes that answer fail (EPIPE): its 'exit' follows.
    worker.on('error', (err: Error) => { log(40, { worker: worker.process.pid, err: err.message }, 'wstunnel worker error') })
    worker.on('exit', (code: number | null, signal: string | null) => {
      workers.delete(worker)
      if (stopping) {
        log(30, { worker: worker.process.pid, code, signal }, 'wstunnel worker stopped')
        // A worker that closed in time exits 0; one still starting has nothing to close, and the signal ends it.
        if (code !== 0 && signal !== 'SIGTERM' && signal !== 'SIGINT') exitCode = 1
        if (workers.size === 0) process.exit(exitCode)
        return
      }
      const now = Date.now()
      deaths.push(now)
      while (deaths[0] <= now - CRASH_WINDOW) deaths.shift()
      if (deaths.length >= CRASH_LIMIT) {
        log(50, { worker: worker.process.pid, code, signal }, `wstunnel workers died ${deaths.length} times in ${CRASH_WINDOW / 1000} s, giving up`)
        stop(1)
        return
      }
      log(40, { worker: worker.process.pid, code, signal }, 'wstunnel worker died, starting another')
      fork()
    })
  }

  function stop (code: number): void {
    stopping = true
    exitCode = code
    if (workers.size === 0) process.exit(exitCode)
    // Each worker closes gracefully on SIGTERM (every bridge gets 1001) and exits.
    for (const worker of workers) worker.process.kill('SIGTERM')
    setTimeout(() => {
      log(50, { workers: [...workers].map(worker => worker.process.pid) }, `wstunnel workers still running after ${stopTimeout / 1000} s, killing them`)
      kill(1)
    }, stopTimeout)
  }

  function kill (code: number): void {
    exitCode = code
    for (const worker of workers) worker.process.kill('SIGKILL')
  }

  function onSignal (signal: NodeJS.Signals): void {
    if (stopping) {
      kill(1) // a second signal: stop waiting
      return
    }
    log(30, { signal }, 'wstunnel stopping workers')
    stop(0)
  }

  // SIGHUP too: a single process (close-with-grace) drains on it, and so do the workers.
  process.on('SIGTERM', onSignal)
  process.on('SIGINT', onSignal)
  process.on('SIGHUP', onSignal)
  log(30, { workers: count }, 'wstunnel starting workers')
  for (let i = 0; i < count; i++) fork()
}

/** Writes one JSON log line shaped like the workers' (Fastify's pino) lines. */
function log (level: number, fields: Record<string, unknown>, msg: string): void {
  process.stdout.write(`${JSON.stringify({ level, time: Date.now(), pid: process.pid, hostname: hostname(), ...fields, msg })}\n`)
}
