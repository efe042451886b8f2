import { readFileSync, watch, type FSWatcher } from 'node:fs'
import { basename, dirname } from 'node:path'

/** A token table as websockify's TokenFile writes it: one `token: host:port` per line, `#` comments. */
export interface TokenFileEntry { token: string, upstream: string, line: number }

/** Parses a token file's text; each line that is not `token: target` adds a problem naming its line. */
export function parseTokenFile (text: string, file: string, problems: string[]): TokenFileEntry[] {
  const entries: TokenFileEntry[] = []
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = raw.trim()
    if (line === '' || line.startsWith('#')) return
    // websockify splits on ': ', so a target may itself hold colons ('[::1]:5900', 'unix:/path').
    const match = /^(\S+?):\s+(\S+)$/.exec(line)
    if (match === null) problems.push(`${file}:${index + 1}: is not 'token: host:port'`)
    else entries.push({ token: match[1], upstream: match[2], line: index + 1 })
  })
  return entries
}

/** Reads a token file; a file that cannot be read adds a problem naming it and gives no entries. */
export function readTokenFile (file: string, problems: string[]): TokenFileEntry[] {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (err) {
    problems.push(`${file}: cannot read the token file: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
    return []
  }
  return parseTokenFile(text, file, problems)
}

/** Calls `changed` soon after the file is written, replaced or renamed into place (editors and config tools
 *  write a new file and rename it), by watching its directory; `failed` if it cannot be watched. Returns the
 *  function that stops watching. */
export function watchTokenFile (file: string, changed: () => void, failed: (err: Error) => void): () => void {
  const name = basename(file)
  let timer: NodeJS.Timeout | null = null
  let watcher: FSWatcher | null = null
  try {
    watcher = watch(dirname(file), { persistent: false }, (_event, changedName) => {
      if (changedName !== null && changedName !== name) return
      // A write comes as several events: read once they settle.
      if (timer !== null) clearTimeout(timer)
      timer = setTimeout(() => { timer = null; changed() }, 50)
    })
    watcher.on('error', failed)
  } catch (err) {
    failed(err as Error) // the table read at registration stays
  }
  return () => {
    if (timer !== null) clearTimeout(timer)
    watcher?.close()
  }
}
