// The unmodified e2b JS SDK against `sandboxd api`: what a program that only changed its
// environment (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY = a key sandboxd issued) sees.
// Run by tests/integration/test_api_js.py: `node e2b_client.mjs TEMPLATE`; prints one JSON
// object of what happened, exits non-zero on an unexpected error.
import { AuthenticationError, CommandExitError, Sandbox, SandboxError } from 'e2b'

const template = process.argv[2] ?? 'default'
const seen = {}

const sandbox = await Sandbox.create(template, { metadata: { job: 'js' }, timeoutMs: 120_000 })
seen.sandboxId = sandbox.sandboxId

const streamed = []
const hi = await sandbox.commands.run('echo hi from $E2B_SANDBOX_ID; echo oops >&2', {
  onStdout: (data) => streamed.push(data),
})
seen.run = { stdout: hi.stdout, stderr: hi.stderr, exitCode: hi.exitCode, streamed: streamed.join('') }

try {
  await sandbox.commands.run('exit 3')
  seen.exit = { thrown: false }
} catch (err) {
  seen.exit = { thrown: err instanceof CommandExitError, exitCode: err.exitCode }
}

await sandbox.files.write('hello.txt', 'written by the JS SDK')
seen.read = await sandbox.files.read('hello.txt')
seen.catOfFile = (await sandbox.commands.run('cat hello.txt')).stdout

const listed = await Sandbox.list({ query: { metadata: { job: 'js' } } }).nextItems()
seen.listed = listed.map((s) => ({ sandboxId: s.sandboxId, metadata: s.metadata }))

try {
  await Sandbox.create('nope')
  seen.unknownTemplate = { thrown: false }
} catch (err) {
  seen.unknownTemplate = {
    thrown: err instanceof SandboxError,
    statusCode: err.statusCode,
    message: err.message,
  }
}

try {
  await Sandbox.create(template, { apiKey: 'sbk_not-a-key' })
  seen.badKey = { thrown: false }
} catch (err) {
  seen.badKey = { thrown: err instanceof AuthenticationError }
}

await sandbox.kill()
seen.afterKill = (await Sandbox.list().nextItems()).map((s) => s.sandboxId)
seen.killAgain = await Sandbox.kill(sandbox.sandboxId)

console.log(JSON.stringify(seen))
