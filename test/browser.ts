import { existsSync } from 'node:fs'
import { chromium, type Browser } from 'playwright-core'

/** Debian's Chromium, which .ci/run installs; Playwright never downloads a browser here. */
export const CHROMIUM = '/usr/bin/chromium'

/** Launches Debian's Chromium headless, as root in a container can run it.
 * Resolves with the browser; rejects if it is missing or has not started in 20 s. */
export async function launchChromium (): Promise<Browser> {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium (as .ci/run does)`)
  return await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Chromium will not start its sandbox as root (crbug.com/638180). Playwright passes both flags today
    // by default; they are named here so a change of its defaults cannot break the launch.
    chromiumSandbox: false,
    // A container's /dev/shm may be too small for Chromium's shared memory: it uses /tmp instead.
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
    timeout: 20000
  })
}
