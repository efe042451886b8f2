import { connect, type Socket } from 'node:net'
import type { UpstreamTarget } from './options'
import { UpstreamTimeoutError, UpstreamUnreachableError } from './errors'

/** Opens a TCP or unix-socket connection to the upstream, resolving once it is established.
 *  Rejects with a 502 error if it is refused, or a 504 error after `timeout` ms. */
export function connectUpstream (target: UpstreamTarget, timeout: number, preamble?: Buffer): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = 'path' in target ? connect({ path: target.path }) : connect({ host: target.host, port: target.port, noDelay: true })
    // The socket timeout doubles as the connect timeout; the bridge later reuses it for idleTimeout.
    if (timeout > 0) socket.setTimeout(timeout)
    function onConnect (): void {
      socket.removeListener('error', onError)
      socket.removeListener('timeout', onTimeout)
      socket.setTimeout(0)
      if (preamble !== undefined) socket.write(preamble)
      resolve(socket)
    }
    function onError (err: NodeJS.ErrnoException): void {
      socket.removeListener('timeout', onTimeout)
      socket.destroy()
      reject(new UpstreamUnreachableError(target.label, err.code ?? err.message, { cause: err }))
    }
    function onTimeout (): void {
      socket.removeListener('error', onError)
      // Errors after the verdict only need a listener, so they cannot crash the process.
      socket.on('error', ignore)
      socket.destroy()
      reject(new UpstreamTimeoutError(target.label, timeout))
    }
    socket.once('connect', onConnect)
    socket.once('error', onError)
    socket.once('timeout', onTimeout)
  })
}

function ignore (): void {}
