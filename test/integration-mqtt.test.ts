import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import mqtt from 'mqtt'
import { openClient, startGateway, startTcp, waitFor } from './helpers'

// A real broker: Debian's mosquitto, which .ci/run installs.
const mosquitto = spawnSync('sh', ['-c', 'command -v mosquitto || ls /usr/sbin/mosquitto'], { encoding: 'utf8' }).stdout.trim().split('\n')[0]

async function freePort (): Promise<number> {
  const server = await startTcp()
  await server.close()
  return server.port
}

async function listening (port: number): Promise<boolean> {
  return new Promise(resolve => {
    const socket = connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true) })
    socket.on('error', () => resolve(false))
  })
}

test('MQTT over WebSocket through the gateway to a real mosquitto broker, chosen by sub-protocol', {
  timeout: 30000,
  skip: mosquitto === '' ? 'mosquitto is not installed (apt-get install mosquitto)' : false
}, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-mqtt-'))
  const port = await freePort()
  writeFileSync(join(dir, 'mosquitto.conf'), `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence false\n`)
  const broker = spawn(mosquitto, ['-c', join(dir, 'mosquitto.conf')], { stdio: 'ignore' })
  t.after(() => { broker.kill(); rmSync(dir, { recursive: true, force: true }) })
  for (let i = 0; i < 100 && !(await listening(port)); i++) await new Promise(resolve => setTimeout(resolve, 50))

  const gateway = await startGateway({
    routes: { '/mqtt': { subprotocols: { mqtt: `127.0.0.1:${port}`, 'mqttv3.1': `127.0.0.1:${port}` }, origins: 'http://localhost:*' } }
  })
  t.after(() => gateway.app.close())

  const options = { wsOptions: { origin: 'http://localhost:3000' }, reconnectPeriod: 0, connectTimeout: 5000 }
  const subscriber = await mqtt.connectAsync(`${gateway.url}/mqtt`, { ...options, clientId: 'sub' })
  const publisher = await mqtt.connectAsync(`${gateway.url}/mqtt`, { ...options, clientId: 'pub' })
  t.after(async () => { await subscriber.endAsync(true); await publisher.endAsync(true) })

  const received: Array<{ topic: string, payload: Buffer }> = []
  subscriber.on('message', (topic, payload) => received.push({ topic, payload }))
  await subscriber.subscribeAsync('room/#', { qos: 1 })
  const binary = Buffer.from(Array.from({ length: 256 }, (_, i) => i))
  await publisher.publishAsync('room/text', 'héllo 𝄞 wörld', { qos: 1 })
  await publisher.publishAsync('room/binary', binary, { qos: 1 })
  await waitFor(() => received.length === 2, 10000)
  assert.equal(received[0].topic, 'room/text')
  assert.equal(received[0].payload.toString(), 'héllo 𝄞 wörld')
  assert.deepEqual(received[1].payload, binary)

  const open = gateway.logs.find('wstunnel bridge open')
  assert.equal(open.length, 2)
  assert.ok(open.every(line => line.subprotocol === 'mqtt'), 'mqtt.js asked for, and got, the mqtt sub-protocol')

  // A page from another origin cannot reach the broker (mqtt.js hangs on a refused handshake, so ask with ws).
  await assert.rejects(openClient(`${gateway.url}/mqtt`, 'mqtt', { origin: 'https://evil.example' }), { statusCode: 403 })
  assert.equal(gateway.logs.find('wstunnel bridge open').length, 2)
})
