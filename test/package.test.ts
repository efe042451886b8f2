import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { join } from 'node:path'

const ROOT = join(__dirname, '..')

test('the built package works from require()', () => {
  const output = execFileSync(process.execPath, ['-e', `
    const plugin = require(${JSON.stringify(ROOT)})
    const meta = plugin[Symbol.for('plugin-meta')]
    console.log(typeof plugin, plugin.default === plugin, plugin.fastifyWstunnel === plugin, meta.name, meta.fastify)
  `], { encoding: 'utf8' })
  assert.equal(output.trim(), 'function true true fastify-wstunnel 5.x')
})

test('the built package works from import, default and named', () => {
  const output = execFileSync(process.execPath, ['--input-type=module', '-e', `
    import wstunnel, { fastifyWstunnel } from ${JSON.stringify(join(ROOT, 'dist', 'index.js'))}
    import Fastify from 'fastify'
    const app = Fastify()
    await app.register(wstunnel, { routes: { '/x': { upstream: '127.0.0.1:9' } } })
    await app.ready()
    console.log(typeof wstunnel, fastifyWstunnel === wstunnel, app.hasRoute({ method: 'GET', url: '/x' }))
    await app.close()
  `], { encoding: 'utf8', cwd: ROOT })
  assert.equal(output.trim(), 'function true true')
})
