variable "name" {
  type        = string
  description = "Prefix of the state bucket and lock table; must start with karrots-."

  validation {
    condition     = can(regex("^karrots-[a-z0-9-]{1,32}$", var.name))
    error_message = "name must be karrots- followed by lowercase letters, digits and '-'."
  }
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}

variable "kms_key_arn" {
  type        = string
  description = "The KMS key that encrypts the state bucket and the lock table."
}

variable "access_log_bucket" {
  type        = string
  description = "The bucket the state bucket's S3 server access logs go to."
}

variable "noncurrent_days" {
  type        = number
  description = "Days an earlier version of a state file is kept."
  default     = 90
}
