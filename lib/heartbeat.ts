/** Something the heartbeat can ping: it answers a beat by pinging, or ends itself if it missed the last one. */
export interface Beating {
  beat (): void
}

/** One timer per interval for all of a route's connections, rather than one timer per connection. */
export class Heartbeat {
  private readonly members = new Set<Beating>()
  private timer: NodeJS.Timeout | null = null

  constructor (private readonly interval: number) {}

  /** Starts pinging `member` at every interval. */
  add (member: Beating): void {
    this.members.add(member)
    if (this.timer === null) this.timer = setInterval(beatAll, this.interval, this.members).unref()
  }

  /** Stops pinging `member`; the timer stops with the last one. */
  delete (member: Beating): void {
    this.members.delete(member)
    if (this.members.size === 0 && this.timer !== null) {
      clearInterval(this.timer)
      this.timer = null
    }
  }
}

function beatAll (members: Set<Beating>): void {
  for (const member of members) member.beat()
}
