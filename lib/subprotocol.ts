import type { IncomingMessage } from 'node:http'
import type { FastifyRequest, onRequestHookHandler } from 'fastify'
import type { WebSocketServer } from 'ws'
import { BadSubprotocolHeaderError, SubprotocolRefusedError } from './errors'
import type { ResolvedRoute } from './options'
import { tokenId } from './token'

const kChosen = Symbol('wstunnel.subprotocol')
type RawWithChoice = IncomingMessage & { [kChosen]?: string | null }

// RFC 7230 token characters: the only ones a sub-protocol name may hold.
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/

/** Parses a Sec-WebSocket-Protocol header into the offered names, in order.
 *  Throws a SyntaxError naming the bad entry when a name is not a token or repeats. */
export function parseSubprotocols (header: string): string[] {
  const offered: string[] = []
  for (const entry of header.split(',')) {
    const name = entry.trim()
    if (!TOKEN.test(name)) throw new SyntaxError(`${JSON.stringify(name)} is not a valid sub-protocol name`)
    if (offered.includes(name)) throw new SyntaxError(`${JSON.stringify(name)} is offered twice`)
    offered.push(name)
  }
  return offered
}

/** Returns the first of the server's `accepted` names that the client offered, or null if none is. */
export function chooseSubprotocol (accepted: readonly string[], offered: readonly string[]): string | null {
  for (const name of accepted) if (offered.includes(name)) return name
  return null
}

/** True if `name` may be a sub-protocol name. */
export function isSubprotocolName (name: string): boolean {
  return TOKEN.test(name)
}

/** The route's sub-protocol choice, an onRequest hook: it refuses with 400 a malformed header, an offer with
 *  no accepted name, or no offer when one is required; else it records the choice for the handshake. */
export function selectSubprotocol (route: Pick<ResolvedRoute, 'subprotocols' | 'requireSubprotocol' | 'upstreams' | 'upstreamBySubprotocol' | 'target'>): onRequestHookHandler {
  const accepted = route.subprotocols.length > 0 ? route.subprotocols.join(', ') : '(none)'
  // With a sub-protocol map and no plain upstream, a client that names none has nowhere to go.
  const required = route.requireSubprotocol || (route.upstreamBySubprotocol !== null && route.upstreams === null)
  // A token sent as the entry '<name>.<token>' is a credential, not a sub-protocol: it is never chosen.
  const bearer = route.target?.from === 'token' && route.target.sources.includes('subprotocol') ? route.target.name + '.' : null
  return function subprotocolChoice (request, _reply, done) {
    const header = request.headers['sec-websocket-protocol']
    let offered: string[] = []
    if (header !== undefined) {
      try {
        offered = parseSubprotocols(header)
      } catch (err) {
        // The message quotes the bad entry, which may be a token: its id goes in the answer and the log.
        return done(new BadSubprotocolHeaderError(bearer === null ? (err as Error).message : redactedProblem(header, bearer)))
      }
      if (bearer !== null) {
        offered = offered.filter(name => !name.startsWith(bearer))
        // A client that offered sub-protocols fails a handshake answered with none (RFC 6455 section 4.1).
        if (offered.length === 0) return done(new SubprotocolRefusedError(`offer a sub-protocol besides the ${route.target?.from === 'token' ? route.target.name : ''}.<token> entry, which is never answered`, accepted))
      }
    }
    let chosen: string | null = null
    if (offered.length > 0 && route.subprotocols.length > 0) {
      chosen = chooseSubprotocol(route.subprotocols, offered)
      if (chosen === null) return done(new SubprotocolRefusedError(`none of ${offered.join(', ')} is accepted`, accepted))
    } else if (required) {
      return done(new SubprotocolRefusedError('a sub-protocol is required', accepted))
    }
    ;(request.raw as RawWithChoice)[kChosen] = chosen
    done()
  }
}

/** What is wrong with a header that holds token entries, told with each token replaced by its id first. */
function redactedProblem (header: string, bearer: string): string {
  const redacted = header.split(',').map(entry => entry.trim().startsWith(bearer) ? bearer + tokenId(entry.trim().slice(bearer.length)) : entry).join(',')
  try {
    parseSubprotocols(redacted)
  } catch (err) {
    return (err as Error).message
  }
  return `a "${bearer}<token>" entry holds a character a sub-protocol name cannot`
}

/** The sub-protocol the route's hook chose for this request, or null. */
export function chosenSubprotocol (request: FastifyRequest): string | null {
  return (request.raw as RawWithChoice)[kChosen] ?? null
}

/** Makes the WebSocket server answer each of our routes' handshakes with the choice its hook recorded
 *  (never a name the client did not offer, none when it offered none); other routes keep their handler. */
export function installSubprotocolChooser (server: WebSocketServer): void {
  const previous = server.options.handleProtocols
  server.options.handleProtocols = function handleProtocols (protocols: Set<string>, request: IncomingMessage): string | false {
    if (kChosen in request) return (request as RawWithChoice)[kChosen] ?? false
    if (previous !== undefined) return previous(protocols, request)
    return protocols.values().next().value ?? false // ws's own default
  }
}
